from setuptools import find_packages, setup

setup(
    name="openmm-snf",
    version="0.1.0",
    description="Stochastic Normalizing Flows for OpenMM: train, sample with exact weights, compute free energies",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the shipped systems live in the top-level systems/ folder and are installed as package data
    # openmm_snf/shipped/<name>/... (openmm_snf.systems finds them there through importlib.resources)
    packages=find_packages(include=["openmm_snf", "openmm_snf.*"]) + ["openmm_snf.shipped"],
    package_dir={"openmm_snf.shipped": "systems"},
    package_data={"openmm_snf.shipped": ["*/*.yaml", "*/*.pdb", "*/*.xml"]},
    install_requires=[
        "openmm>=8.1",
        "openmmtools",
        "mdtraj",
        "torch>=2.2",
        "numba>=0.59",
        "numpy",
        "scipy",
        "pymbar>=4",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "cuda12": ["openmm[cuda12]>=8.1"],
        "cuda13": ["openmm-cuda-13"],
    },
    entry_points={"console_scripts": ["openmm-snf=openmm_snf.cli:main"]},
)

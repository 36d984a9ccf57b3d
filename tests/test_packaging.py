"""A wheel (``pip install .``, not ``-e``) holds the shipped systems: build one, install it into a fresh
virtual environment and load ``alanine_dipeptide_vacuum`` there, away from the source tree."""
import importlib.util
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import openmm_snf, openmm_snf.systems as systems
from openmm_snf.systems import load_system, shipped_systems
mol = load_system("alanine_dipeptide_vacuum")
assert "site-packages" in openmm_snf.__file__ and "site-packages" in str(systems.SHIPPED_DIR), systems.SHIPPED_DIR
print(mol.n_atoms, ",".join(shipped_systems()))
"""


def _run(*argv, **kwargs):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_and_loads_a_shipped_system(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("openmm_snf", "systems"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("openmm_snf-*.whl"))

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    python = venv / "bin" / "python"
    # torch, openmm, ... come from this interpreter's environment (appended after the venv's own packages)
    venv_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    outer = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (venv_site / "outer-environment.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)

    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    out = _run(python, "-c", CHECK, cwd=tmp_path, env=env)
    shipped = sorted(p.name for p in (ROOT / "systems").iterdir() if (p / "metadata.yaml").is_file())
    assert out.split() == ["22", ",".join(shipped)]

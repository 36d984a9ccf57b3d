"""The automatic platform choice, with the platform list mocked: GPUs first, never an OpenCL CPU device,
and a route that fails to build or to match the Reference platform on a tiny batch is not chosen."""
import warnings

import numpy as np
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy, platforms
from openmm_snf.energy.platforms import PlatformChoice, choose_platform
from openmm_snf import md as md_module
from openmm_snf.md import MDSettings, run_md


@pytest.fixture
def machine(monkeypatch):
    """Set the loaded platforms, the OpenCL GPUs and which platforms can make a Context."""
    def configure(loaded, opencl_gpus=(), usable=("Reference", "CPU")):
        monkeypatch.setattr(platforms, "available_platforms", lambda: list(loaded))
        monkeypatch.setattr(platforms, "opencl_gpu_devices", lambda: list(opencl_gpus))
        monkeypatch.setattr(platforms, "usable", lambda choice: choice.name in usable)
    return configure


def test_cpu_machine_with_an_opencl_cpu_runtime_picks_the_cpu(machine):
    machine(["Reference", "CPU", "OpenCL"], opencl_gpus=[], usable=("Reference", "CPU", "OpenCL"))
    choice = choose_platform(None)
    assert choice.name == "CPU" and "OpenCL has no GPU device" in choice.reason
    assert [c.name for c in platforms.auto_candidates()] == ["CPU", "Reference"]


def test_gpus_come_first_cuda_before_opencl(machine):
    machine(["Reference", "CPU", "OpenCL", "CUDA"], opencl_gpus=[(1, 0)], usable=("Reference", "CPU", "OpenCL", "CUDA"))
    assert choose_platform("auto").name == "CUDA"
    opencl = platforms.auto_candidates()[1]
    assert opencl.name == "OpenCL" and opencl.properties == {"OpenCLPlatformIndex": "1"}
    machine(["Reference", "CPU", "OpenCL", "CUDA"], opencl_gpus=[(0, 2)], usable=("Reference", "CPU", "OpenCL"))
    choice = choose_platform(None)  # CUDA loaded but without a usable device
    assert choice.name == "OpenCL" and choice.properties == {"OpenCLPlatformIndex": "0", "DeviceIndex": "2"}


def test_named_platforms_are_taken_as_named(machine):
    machine(["Reference", "CPU"])
    assert choose_platform("cpu") == PlatformChoice("CPU", {}, "chosen by name")
    with pytest.raises(ValueError, match="not available here; available: Reference, CPU"):
        choose_platform("CUDA")


def test_a_route_that_fails_is_not_chosen(monkeypatch):
    mol = load_system("alanine_dipeptide_implicit")
    cuda = PlatformChoice("CUDA", {}, "CUDA: a GPU")  # not loaded here
    cpu, reference = PlatformChoice("CPU", {}, "CPU"), PlatformChoice("Reference", {}, "Reference")
    monkeypatch.setattr(platforms, "auto_candidates", lambda: [cuda, cpu, reference])
    model = OpenMMEnergy(mol)
    assert model.platform_name == "CPU" and model.forces_from == "compiled" and "[auto: CPU]" in model.describe()
    probe = OpenMMEnergy._probe

    def failing_on_cpu(self, tolerance=1e-3):  # a route whose tiny batches disagree with Reference
        return probe(self, tolerance=-1.0 if self.platform_name == "CPU" else tolerance)

    monkeypatch.setattr(OpenMMEnergy, "_probe", failing_on_cpu)
    with pytest.warns(UserWarning, match="OpenMM platform CPU not chosen: a batch of 1 on OpenMM CPU differs"):
        model = OpenMMEnergy(mol)
    assert model.platform_name == "Reference"
    monkeypatch.setattr(platforms, "usable", lambda choice: True)  # CUDA "usable" here, then fails to build
    with pytest.warns(UserWarning) as record:
        assert OpenMMEnergy(mol).platform_name == "Reference"
    assert [str(w.message).split(":")[0] for w in record] == ["OpenMM platform CUDA not chosen",
                                                              "OpenMM platform CPU not chosen"]
    with pytest.raises(RuntimeError, match="differs from the Reference platform"):  # nothing left: the error
        monkeypatch.setattr(platforms, "auto_candidates", lambda: [cpu])
        OpenMMEnergy(mol)


def test_auto_route_on_tiny_batches_and_md_share_the_choice(machine, monkeypatch):
    machine(["Reference", "CPU", "OpenCL"], opencl_gpus=[], usable=("Reference", "CPU", "OpenCL"))
    mol = load_system("alanine_dipeptide_implicit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no route was tried and dropped
        model = OpenMMEnergy(mol, platform="auto")
    assert model.platform_name == "CPU" and "OpenCL has no GPU device" in model.platform_choice
    rng = np.random.default_rng(0)
    for batch in range(1, 9):
        x = torch.as_tensor(mol.positions[None] + 0.01 * rng.standard_normal((batch, mol.n_atoms, 3)))
        u, f = model.energy_and_forces(x)
        assert torch.isfinite(u).all() and torch.isfinite(f).all() and torch.all(model.last_flags == 0)
    machine(["Reference", "CPU"], usable=("Reference",))  # a CPU platform that cannot make a Context
    assert OpenMMEnergy(mol).platform_name == "Reference"
    settings = MDSettings(n_frames=2, steps_per_frame=2, n_replicas=2, equilibration_steps=0)
    contexts, real = [], md_module.openmm.Context
    monkeypatch.setattr(md_module.openmm, "Context", lambda *args: contexts.append(args[2].getName()) or real(*args))
    frames = run_md(mol, settings, progress=False)
    assert frames.shape == (2, 2, mol.n_atoms, 3) and contexts == ["Reference"]

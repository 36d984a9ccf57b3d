"""The top-level API: README's example runs as written; quantities, string force fields, SNFSample.to_mdtraj."""
import re
from pathlib import Path

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest
import torch

import openmm_snf
from openmm_snf.flows import SNFSample
from openmm_snf.md import MDSettings

README = Path(__file__).resolve().parent.parent / "README.md"
PEPTIDE = Path(__file__).resolve().parent / "data" / "ace_ser_phe_nme.pdb"


def _readme_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_readme_api_example(), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Kish ESS" in printed and "dF(A - B)" in printed
    result, samples, traj, weights = (namespace[k] for k in ("result", "samples", "traj", "weights"))
    assert abs(result.delta_f - 1.6906) < 0.5, result.summary()  # exact F(x<0) - F(x>0), see test_cli.py
    assert samples.traj.n_frames == 2000 and (tmp_path / "dw_samples.weights.npz").is_file()
    assert isinstance(traj, mdtraj.Trajectory) and traj.n_frames == 500
    np.testing.assert_allclose(weights.sum(), 1.0)
    # the written files hold what the function returned
    again = openmm_snf.free_energy(tmp_path / "dw_samples.dcd", "A: x < 0", "B: x > 0")
    assert again.delta_f == pytest.approx(result.delta_f, abs=1e-4)
    # n="auto" as 'sample --n auto' (capped here at one round of 2,000); the first round is seed's n samples
    auto = openmm_snf.sample(namespace["run"], "auto", seed=1, max_n=2000, anneal=0, progress=False)
    fixed = openmm_snf.sample(namespace["run"], 2000, seed=1, anneal=0, progress=False)
    np.testing.assert_array_equal(auto.log_weights, fixed.log_weights)


def test_quantities_are_accepted():
    plain = openmm_snf.load_system("double_well", temperature=300.0)
    with_units = openmm_snf.load_system("double_well", temperature=300 * unit.kelvin)
    assert with_units.temperature == plain.temperature == 300.0
    assert plain.with_temperature(1000 * unit.kelvin).temperature == 1000.0
    settings = MDSettings(timestep=0.002 * unit.picoseconds, friction=5 / unit.picosecond,
                          temperature=310 * unit.kelvin)
    assert (settings.timestep, settings.friction, settings.temperature) == pytest.approx((2.0, 5.0, 310.0))
    starts = MDSettings(starts=[[[-17.0, 0.0, 0.0]]] * unit.angstrom).starts
    assert np.allclose(starts, [[[-1.7, 0.0, 0.0]]]) and isinstance(starts, list)
    with pytest.raises(ValueError, match="temperature must be a number of kelvin"):
        openmm_snf.load_system("double_well", temperature=3 * unit.nanometer)
    with pytest.raises(ValueError, match="timestep must be a number of femtosecond"):
        MDSettings(timestep=1 * unit.kelvin)


def test_a_force_field_may_be_one_string():
    mol = openmm_snf.load_system(PEPTIDE, forcefield="amber14-all.xml")
    assert mol.n_atoms == openmm_snf.load_system(PEPTIDE, forcefield=["amber14-all.xml"]).n_atoms


def test_snf_sample_to_mdtraj():
    mol = openmm_snf.load_system(PEPTIDE)
    x = torch.as_tensor(np.stack([mol.positions, mol.positions + 0.1]).reshape(2, -1), dtype=torch.float32)
    log_w = torch.tensor([0.0, np.log(3.0)], dtype=torch.float64)
    sample = SNFSample(x, log_w, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    for topology in (mol, mol.topology, mol.mdtraj_topology()):
        traj, weights = sample.to_mdtraj(topology)
        np.testing.assert_allclose(traj.xyz[1], mol.positions + 0.1, atol=1e-6)
        np.testing.assert_allclose(weights, [0.25, 0.75])
    with pytest.raises(ValueError, match="the samples have 1 atoms, the topology"):
        SNFSample(x[:, :3], log_w, log_w, log_w).to_mdtraj(mol)

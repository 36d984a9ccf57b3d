"""Reference MD: replicas in one Context, DCD output readable by mdtraj, CLI md."""
import mdtraj
import numpy as np
import pytest

from openmm_snf import load_system
from openmm_snf.cli import main
from openmm_snf.md import MDSettings, run_md


def test_replicas_are_independent_and_shaped():
    mol = load_system("alanine_dipeptide_vacuum")
    frames = run_md(mol, MDSettings(n_frames=5, steps_per_frame=50, n_replicas=3, equilibration_steps=50),
                    progress=False)
    assert frames.shape == (3, 5, 22, 3)
    assert np.all(np.isfinite(frames))
    # different noise per replica: the copies have left their common start
    assert np.abs(frames[0] - frames[1]).max() > 1e-3
    # recentred: every replica stays at its own origin (the exactness condition of the replicas)
    np.testing.assert_allclose(frames.mean(axis=2), 0.0, atol=1e-9)
    # bond lengths stay physical (C-N peptide bond ~0.133 nm)
    bond = np.linalg.norm(frames[..., 4, :] - frames[..., 6, :], axis=-1)
    assert np.all((bond > 0.11) & (bond < 0.16))


def test_double_well_md_samples_the_wells():
    """At 300 K the particle stays in the well it starts in (x ~ -1.7) with <y^2> = 1 (harmonic, u = y^2/2)."""
    mol = load_system("double_well")
    frames = run_md(mol, MDSettings(n_frames=400, steps_per_frame=20, n_replicas=32, timestep=5.0, friction=5.0,
                                    equilibration_steps=200), progress=False)
    xyz = frames.reshape(-1, 3)
    assert np.all(xyz[:, 0] < 0)
    # variance of y should be 1 (kT units); frames are correlated, so allow a loose bound
    assert 0.8 < xyz[:, 1].var() < 1.2


def test_same_seed_same_trajectory():
    mol = load_system("alanine_dipeptide_vacuum")
    settings = MDSettings(n_frames=2, steps_per_frame=20, n_replicas=2, equilibration_steps=0, seed=7)
    a = run_md(mol, settings, platform="Reference", progress=False)
    b = run_md(mol, settings, platform="Reference", progress=False)
    np.testing.assert_array_equal(a, b)


def test_hydrogen_mass_repartitioning():
    """Hydrogens get 3 amu from their heavy atoms (total mass kept), and the MD uses those masses: stable at
    2-fs steps, and a different trajectory from the same seed with the System's masses."""
    mol = load_system("alanine_dipeptide_vacuum")
    plain, heavy = mol.masses(), mol.masses(3.0)
    hydrogens = np.array([atom.element.symbol == "H" for atom in mol.topology.atoms()])
    assert heavy.sum() == pytest.approx(plain.sum()) and np.all(heavy[hydrogens] == 3.0)
    assert np.all(heavy[~hydrogens] <= plain[~hydrogens]) and np.all(heavy > 0)
    settings = dict(n_frames=20, steps_per_frame=50, n_replicas=2, equilibration_steps=100, seed=3)
    frames = run_md(mol, MDSettings(timestep=2.0, hydrogen_mass=3.0, **settings), progress=False)
    bond = np.linalg.norm(frames[..., 4, :] - frames[..., 6, :], axis=-1)  # C-N peptide bond ~0.133 nm
    assert np.all(np.isfinite(frames)) and np.all((bond > 0.11) & (bond < 0.16))
    same_seed = run_md(mol, MDSettings(timestep=2.0, **settings), progress=False)
    assert np.abs(same_seed - frames).max() > 1e-3
    with pytest.raises(ValueError, match="hydrogen_mass must be between 0 and 6 amu"):
        run_md(mol, MDSettings(hydrogen_mass=7.0))


def test_bad_settings():
    mol = load_system("double_well")
    with pytest.raises(ValueError, match="n_replicas must be a positive integer"):
        run_md(mol, MDSettings(n_replicas=0))
    with pytest.raises(ValueError, match="timestep must be positive"):
        run_md(mol, MDSettings(timestep=-1.0))


def test_cli_md_writes_dcd_mdtraj_reads(tmp_path, capsys):
    out = tmp_path / "md.dcd"
    argv = ["md", "alanine_dipeptide_vacuum", "--out", str(out), "--frames", "4", "--steps-per-frame", "10",
            "--replicas", "3", "--equilibration", "10"]
    assert main(argv) == 0
    from openmm_snf.energy.platforms import choose_platform
    assert f"md: OpenMM {choose_platform().name} [auto: " in capsys.readouterr().out  # says which platform
    traj = mdtraj.load(str(out), top=str(tmp_path / "md.pdb"))
    assert traj.n_atoms == 22 and traj.n_frames == 12
    before = out.read_bytes()
    assert main(argv) == 2
    assert "output exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_md_missing_system(tmp_path, capsys):
    assert main(["md", str(tmp_path / "nothing.pdb"), "--out", str(tmp_path / "x.dcd")]) == 2
    err = capsys.readouterr().err
    assert "nothing.pdb" in err and "neither a shipped system" in err
    assert not (tmp_path / "x.dcd").exists()


def test_starts_put_replicas_in_both_wells():
    mol = load_system("double_well")
    settings = MDSettings(n_frames=50, steps_per_frame=20, n_replicas=4, timestep=5.0, friction=5.0,
                          equilibration_steps=100, starts=[[[-1.7, 0, 0]], [[1.7, 0, 0]]])
    frames = run_md(mol, settings, progress=False)
    assert np.all(frames[0::2, :, 0, 0] < 0) and np.all(frames[1::2, :, 0, 0] > 0)
    with pytest.raises(ValueError, match=r"starts must be a list of finite \(1, 3\) nm structures"):
        run_md(mol, MDSettings(starts=[[0.0, 0.0]]))


def test_cli_md_tempers_by_default_and_weights_for_the_target(tmp_path, capsys):
    """The README workflow's first step: 'md double_well' alone reaches both wells (no hand-placed starts)
    and its sidecar weights give the exact right-well population; --max-temperature T is plain MD."""
    out = tmp_path / "md.dcd"
    assert main(["md", "double_well", "--out", str(out), "--seed", "3"]) == 0
    assert "parallel tempering" in capsys.readouterr().out
    sidecar = np.load(tmp_path / "md.weights.npz")
    traj = mdtraj.load(str(out), top=str(tmp_path / "md.pdb"))
    x = traj.xyz[:, 0, 0]
    assert len(sidecar["temperatures"]) >= 2 and sidecar["temperature_index"].shape == x.shape
    right = float(sidecar["weights"][x > 0].sum())
    assert abs(right - 0.8443) < 0.06, right
    plain = tmp_path / "plain.dcd"
    assert main(["md", "double_well", "--out", str(plain), "--max-temperature", "300", "--frames", "100",
                 "--equilibration", "0"]) == 0
    assert np.mean(mdtraj.load(str(plain), top=str(tmp_path / "plain.pdb")).xyz[:, 0, 0] > 0) < 0.05
    assert main(["md", "double_well", "--out", str(tmp_path / "m.dcd"), "--method", "md",
                 "--temperatures", "3"]) == 2
    assert "--method tempering" in capsys.readouterr().err

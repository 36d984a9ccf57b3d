"""Weighted DCD export: round trip through mdtraj, sidecars, atomic no-overwrite writes, bad-input messages."""
import csv

import mdtraj
import numpy as np
import pytest

from openmm_snf.io import (InputError, OutputExistsError, WeightedTrajectory, atomic_outputs,
                           read_trajectory, read_weighted_trajectory, resample, trajectory_paths,
                           write_resampled_trajectory, write_trajectory, write_weighted_trajectory)
from openmm_snf.systems import load_system
from openmm_snf.weights import kish_ess


@pytest.fixture(scope="module")
def aldp():
    return load_system("alanine_dipeptide_vacuum")


@pytest.fixture(scope="module")
def double_well():
    return load_system("double_well")


def _frames(mol, n, seed=0):
    rng = np.random.default_rng(seed)
    return mol.positions[None] + 0.02 * rng.standard_normal((n, mol.n_atoms, 3))


def _write_samples(path, mol, n=7, seed=0, **kwargs):
    rng = np.random.default_rng(seed + 1)
    xyz = _frames(mol, n, seed)
    log_w, energies = 3.0 * rng.standard_normal(n), rng.standard_normal(n)
    write_weighted_trajectory(path, mol, xyz, log_w, energies, **kwargs)
    return xyz, log_w, energies


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_paths_beside_the_dcd(tmp_path):
    paths = trajectory_paths(tmp_path / "samples.dcd")
    assert (paths.pdb.name, paths.npz.name, paths.csv.name) == ("samples.pdb", "samples.weights.npz",
                                                                 "samples.weights.csv")
    with pytest.raises(InputError, match=r"must end in \.dcd"):
        trajectory_paths(tmp_path / "samples.xtc")


def test_weighted_round_trip_through_mdtraj(tmp_path, aldp):
    xyz, log_w, energies = _write_samples(tmp_path / "samples.dcd", aldp, extra={"temperature": 1000.0,
                                                                                   "prior_energy": np.arange(7.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.dcd", "samples.pdb", "samples.weights.csv",
                                                          "samples.weights.npz"]
    plain = mdtraj.load(str(tmp_path / "samples.dcd"), top=str(tmp_path / "samples.pdb"))
    assert plain.n_frames == 7 and plain.n_atoms == 22
    assert [a.name for a in plain.topology.atoms] == [a.name for a in aldp.topology.atoms()]
    np.testing.assert_allclose(plain.xyz, xyz, atol=1e-5)  # DCD stores float32 Angstrom

    loaded = read_weighted_trajectory(tmp_path / "samples.dcd")
    np.testing.assert_allclose(loaded.traj.xyz, xyz, atol=1e-5)
    np.testing.assert_array_equal(loaded.log_weights, log_w)
    np.testing.assert_array_equal(loaded.reduced_energies, energies)
    assert float(loaded.extra["temperature"]) == 1000.0
    assert loaded.ess == pytest.approx(kish_ess(log_w))
    with np.load(tmp_path / "samples.weights.npz") as data:
        np.testing.assert_allclose(data["weights"], np.exp(log_w) / np.exp(log_w).sum(), rtol=1e-12)

    with open(tmp_path / "samples.weights.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["frame", "log_weights", "weights", "reduced_energies", "prior_energy"]
    assert [int(r["frame"]) for r in rows] == list(range(7))
    np.testing.assert_array_equal([float(r["log_weights"]) for r in rows], log_w)  # %.17g is exact


def test_torch_inputs_are_accepted(tmp_path, aldp):
    import torch
    xyz = torch.tensor(_frames(aldp, 3), dtype=torch.float32, requires_grad=True)
    log_w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    write_weighted_trajectory(tmp_path / "t.dcd", aldp, xyz, log_w, torch.ones(3), extra={"beta": torch.ones(3)})
    loaded = read_weighted_trajectory(tmp_path / "t.dcd")
    np.testing.assert_allclose(loaded.traj.xyz, xyz.detach().numpy(), atol=1e-5)
    np.testing.assert_array_equal(loaded.extra["beta"], np.ones(3))


def test_extra_fields_must_be_plain_arrays(tmp_path, aldp):
    with pytest.raises(InputError, match=r"extra field 'config' must be numeric or text"):
        _write_samples(tmp_path / "s.dcd", aldp, extra={"config": {"a": 1}})
    with pytest.raises(InputError, match=r"extra key 'weights' would shadow"):
        _write_samples(tmp_path / "s.dcd", aldp, extra={"weights": np.zeros(7)})
    assert list(tmp_path.iterdir()) == []


def test_one_particle_system_round_trip(tmp_path, double_well):
    xyz, log_w, _ = _write_samples(tmp_path / "dw.dcd", double_well, n=5)
    loaded = read_weighted_trajectory(tmp_path / "dw.dcd")
    np.testing.assert_allclose(loaded.traj.xyz, xyz, atol=1e-5)
    assert loaded.n_frames == 5


def test_unweighted_trajectory_and_explicit_topology(tmp_path, aldp):
    xyz = _frames(aldp, 4)
    paths = write_trajectory(tmp_path / "md.dcd", aldp.topology, xyz)
    assert paths.pdb.is_file() and not paths.npz.exists()
    traj = read_trajectory(tmp_path / "md.dcd", top=aldp)
    np.testing.assert_allclose(traj.xyz, xyz, atol=1e-5)
    assert WeightedTrajectory.unweighted(traj).ess == pytest.approx(4.0)
    with pytest.raises(InputError, match=r"weights file not found: .*md\.weights\.npz"):
        read_weighted_trajectory(tmp_path / "md.dcd")


def test_existing_outputs_are_refused_and_kept(tmp_path, aldp):
    (tmp_path / "samples.weights.csv").write_text("precious\n")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=r"output exists: .*samples\.weights\.csv.*--force"):
        _write_samples(tmp_path / "samples.dcd", aldp)
    assert _snapshot(tmp_path) == before  # nothing else written, no temporary left behind


def test_force_overwrites_everything(tmp_path, aldp):
    _write_samples(tmp_path / "samples.dcd", aldp, n=7, seed=0)
    with pytest.raises(OutputExistsError):
        write_trajectory(tmp_path / "samples.dcd", aldp, _frames(aldp, 3))
    _, log_w, _ = _write_samples(tmp_path / "samples.dcd", aldp, n=3, seed=5, force=True)
    loaded = read_weighted_trajectory(tmp_path / "samples.dcd")
    assert loaded.n_frames == 3
    np.testing.assert_array_equal(loaded.log_weights, log_w)
    assert len(list(tmp_path.iterdir())) == 4


def test_interrupted_write_leaves_nothing(tmp_path):
    final = tmp_path / "a.png"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_outputs([final, tmp_path / "b.dcd"], force=True) as (t_png, t_dcd):
            t_png.write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert final.read_bytes() == b"old"


@pytest.mark.parametrize("change, message", [
    (lambda xyz, lw, e: (xyz[:, :21], lw, e), r"shape \(n_frames, 22, 3\)"),
    (lambda xyz, lw, e: (xyz, lw[:-1], e), r"log_weights has shape \(6,\), expected \(7,\)"),
    (lambda xyz, lw, e: (xyz, np.where(np.arange(7) == 3, np.nan, lw), e),
     r"log_weights is not finite .* frame\(s\) 3"),
    (lambda xyz, lw, e: (xyz, lw, np.where(np.arange(7) == 5, np.inf, e)), r"reduced_energies is not finite .* 5"),
])
def test_bad_arrays_are_refused_before_writing(tmp_path, aldp, change, message):
    rng = np.random.default_rng(0)
    xyz, log_w, energies = change(_frames(aldp, 7), rng.standard_normal(7), rng.standard_normal(7))
    with pytest.raises(InputError, match=message):
        write_weighted_trajectory(tmp_path / "s.dcd", aldp, xyz, log_w, energies)
    assert list(tmp_path.iterdir()) == []


def test_missing_files(tmp_path, aldp):
    with pytest.raises(InputError, match=r"trajectory file not found: .*nothing\.dcd"):
        read_trajectory(tmp_path / "nothing.dcd")
    write_trajectory(tmp_path / "md.dcd", aldp, _frames(aldp, 2))
    (tmp_path / "md.pdb").unlink()
    with pytest.raises(InputError, match=r"topology file not found: .*md\.pdb \(expected beside the DCD"):
        read_trajectory(tmp_path / "md.dcd")
    with pytest.raises(InputError, match=r"folder .*no_such_folder does not exist"):
        write_trajectory(tmp_path / "no_such_folder" / "md.dcd", aldp, _frames(aldp, 2))


def test_atom_count_mismatch(tmp_path, aldp, double_well):
    _write_samples(tmp_path / "s.dcd", aldp)
    double_well.write_pdb(tmp_path / "one_atom.pdb")
    with pytest.raises(InputError, match=r"atom count mismatch: .*s\.dcd has 22 atoms per frame, the topology "
                                         r".*one_atom\.pdb has 1"):
        read_weighted_trajectory(tmp_path / "s.dcd", top=tmp_path / "one_atom.pdb")


def _tamper_weights(path, **changes):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("changes, message", [
    ({"log_weights": np.zeros(6)}, r"log_weights has shape \(6,\), expected \(7,\)"),
    ({"log_weights": np.array([0, 0, np.inf, 0, np.nan, 0, 0.0])},
     r"log_weights is not finite \(nan or inf\) at frame\(s\) 2, 4"),
    ({"reduced_energies": np.zeros(9)}, r"reduced_energies has shape \(9,\)"),
])
def test_bad_weights_file(tmp_path, aldp, changes, message):
    _write_samples(tmp_path / "s.dcd", aldp)
    _tamper_weights(tmp_path / "s.weights.npz", **changes)
    with pytest.raises(InputError, match=r"s\.weights\.npz vs .*s\.dcd: " + message):
        read_weighted_trajectory(tmp_path / "s.dcd")


def test_weights_file_without_log_weights(tmp_path, aldp):
    _write_samples(tmp_path / "s.dcd", aldp)
    np.savez(tmp_path / "s.weights.npz", something=np.zeros(7))
    with pytest.raises(InputError, match=r"field 'log_weights' is missing \(found: something\)"):
        read_weighted_trajectory(tmp_path / "s.dcd")


def test_corrupt_dcd(tmp_path, aldp):
    _write_samples(tmp_path / "s.dcd", aldp)
    (tmp_path / "s.dcd").write_bytes(b"not a dcd file at all")
    with pytest.raises(InputError, match=r"could not read DCD .*s\.dcd"):
        read_weighted_trajectory(tmp_path / "s.dcd")


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
def test_resampling_follows_the_weights(method):
    probabilities = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    with np.errstate(divide="ignore"):
        log_w = np.log(probabilities) + 7.0
    log_w[4] = -800.0  # weight ~0, never drawn
    n = 20000
    indices = resample(log_w, n, np.random.default_rng(0), method)
    frequencies = np.bincount(indices, minlength=5) / n
    sigma = np.sqrt(probabilities * (1 - probabilities) / n)
    assert np.all(np.abs(frequencies - probabilities) <= 5 * sigma + 1e-12)
    if method == "systematic":  # each count is within one of n * p
        assert np.all(np.abs(np.bincount(indices, minlength=5) - n * probabilities) <= 1)


def test_write_resampled_trajectory(tmp_path, aldp):
    xyz, log_w, _ = _write_samples(tmp_path / "s.dcd", aldp, n=7)
    weighted = read_weighted_trajectory(tmp_path / "s.dcd")
    result = write_resampled_trajectory(tmp_path / "resampled.dcd", weighted, 50, np.random.default_rng(1))
    assert result.n_unique == len(np.unique(result.indices)) and 1 <= result.n_unique <= 7
    traj = read_trajectory(tmp_path / "resampled.dcd")
    np.testing.assert_allclose(traj.xyz, xyz[result.indices], atol=1e-5)
    assert not (tmp_path / "resampled.weights.npz").exists()
    with pytest.raises(ValueError, match="positive integer"):
        resample(log_w, 0, np.random.default_rng(0))

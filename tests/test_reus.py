"""Replica-exchange umbrella sampling with Metropolized dynamics: exact answers at a large time step,
exchange bookkeeping, periodic grids."""
import mdtraj
import numpy as np
import pytest

from openmm_snf import load_system
from openmm_snf.analysis.umbrella import umbrella_dihedral, umbrella_mbar
from openmm_snf.md import UmbrellaBias
from openmm_snf.reus import ExchangeSettings, _Windows, run_exchange_umbrella

from test_umbrella import exact_delta_f


def test_a_grid_over_the_double_well_is_exact_at_a_time_step_langevin_cannot_take():
    """5 x 3 windows over x and y of the shipped double well (u = x⁴ − 6x² − 0.5x + y²/2 + z²/2) at 150 fs,
    where a quarter of the GHMC steps are rejected: MBAR recovers ΔF(x>0 − x<0) and <y²> = 1 exactly."""
    mol = load_system("double_well")
    x_centres, y_centres = np.linspace(-1.5, 1.5, 5), np.array([-1.0, 0.0, 1.0])
    grid = np.stack(np.meshgrid(x_centres, y_centres, indexing="ij"), axis=-1).reshape(-1, 2)
    biases = (UmbrellaBias("position", [0], grid[:, 0], 8.0), UmbrellaBias("position", [0], grid[:, 1], 1.0, axis=1))
    starts = np.array([[[cx, cy, 0.0]] for cx, cy in grid])
    run = run_exchange_umbrella(mol, biases, (5, 3), ExchangeSettings(
        n_frames=1500, steps_per_frame=10, timestep=150.0, friction=5.0, hydrogen_mass=None,
        equilibration_steps=200, seed=2), starts=starts, progress=False)
    assert 0.5 < run.md_acceptance < 0.95, run.md_acceptance
    assert all(0.05 < rate < 0.95 for rate in run.exchange_acceptance), run.exchange_acceptance
    # every frame sits in its window: the means follow the grid
    assert np.all(np.diff(run.cvs[0].mean(1).reshape(5, 3), axis=0) > 0.1)
    assert np.all(np.diff(run.cvs[1].mean(1).reshape(5, 3), axis=1) > 0.3)
    analysis = umbrella_mbar(tuple(run.cvs), biases)
    x, y = run.cvs[0].reshape(-1), run.cvs[1].reshape(-1)
    result = analysis.delta_f(x > 0, x < 0)
    assert abs(result.delta_f - exact_delta_f()) < 4 * result.std and result.std < 0.2, (result.delta_f, result.std)
    weights = np.exp(analysis.log_weights)
    y2 = float(np.sum(weights * y ** 2))
    se = np.sqrt(np.sum(weights ** 2 * (y ** 2 - y2) ** 2) * np.mean(analysis.statistical_inefficiency))
    assert abs(y2 - 1.0) < 4 * se + 0.02, (y2, se)


def test_without_metropolis_every_step_is_taken_and_small_steps_stay_close_to_exact():
    """metropolize=False: Langevin dynamics in the same splitting (every step accepted); at 20 fs, where
    GHMC accepts > 99.5% of the double well's steps, its bias is below this run's error."""
    mol = load_system("double_well")
    centers = np.linspace(-1.5, 1.5, 7)
    bias = UmbrellaBias("position", [0], centers, 15.0)
    run = run_exchange_umbrella(mol, bias, (7,), ExchangeSettings(
        n_frames=2000, steps_per_frame=10, timestep=20.0, friction=5.0, hydrogen_mass=None, equilibration_steps=200,
        seed=4, metropolize=False), starts=np.array([[[c, 0.0, 0.0]] for c in centers]), progress=False)
    assert run.md_acceptance == 1.0
    result = umbrella_mbar(run.cvs[0], bias).delta_f(run.cvs[0].reshape(-1) > 0, run.cvs[0].reshape(-1) < 0)
    assert abs(result.delta_f - exact_delta_f()) < 4 * result.std and result.std < 0.25, (result.delta_f, result.std)


def test_neighbour_pairs_on_a_periodic_grid():
    """Each exchange pattern pairs every window at most once; together the patterns link every neighbour
    pair of a periodic axis of even length (its last window with its first too), and of an odd one
    every pair but the wrap (it would need a window in two pairs)."""
    mol = load_system("alanine_dipeptide_implicit")
    phi, _ = umbrella_dihedral(mol, "phi")
    psi, _ = umbrella_dihedral(mol, "psi")
    shape = (4, 3)
    centers = np.stack(np.meshgrid(np.linspace(-np.pi, np.pi, 4, endpoint=False),
                                   np.linspace(-np.pi, np.pi, 3, endpoint=False), indexing="ij"), -1).reshape(-1, 2)
    windows = _Windows((UmbrellaBias("dihedral", phi, centers[:, 0], 10.0),
                        UmbrellaBias("dihedral", psi, centers[:, 1], 10.0)), shape, mol.n_atoms)
    index = np.arange(12).reshape(shape)
    for axis, n in enumerate(shape):
        linked = set()
        for parity in (0, 1):
            i, j = windows.pairs(axis, parity)
            assert len(set(i) | set(j)) == 2 * len(i)  # no window in two pairs
            linked |= {tuple(sorted(p)) for p in zip(i, j)}
        expected = {tuple(sorted((int(a), int(b)))) for a, b in zip(index.reshape(-1), np.roll(index, -1, axis).reshape(-1))
                    if n % 2 == 0 or np.unravel_index(a, shape)[axis] != n - 1}
        assert linked == expected


def test_alanine_dipeptide_windows_hold_their_centres_and_report_their_frames_cvs():
    """A 6 x 6 (phi, psi) grid from one structure: after 4 ps every window holds its centre (wrapping at ±π),
    copies swap along both axes, and the CVs returned are those of the frames stored for each window."""
    mol = load_system("alanine_dipeptide_implicit")
    phi, _ = umbrella_dihedral(mol, "phi")
    psi, _ = umbrella_dihedral(mol, "psi")
    axis = np.linspace(-np.pi, np.pi, 6, endpoint=False)
    centers = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    biases = (UmbrellaBias("dihedral", phi, centers[:, 0], 50.0), UmbrellaBias("dihedral", psi, centers[:, 1], 50.0))
    run = run_exchange_umbrella(mol, biases, (6, 6), ExchangeSettings(n_frames=10, steps_per_frame=20,
                                                                      equilibration_steps=2000, seed=1),
                                progress=False)
    assert run.xyz.shape == (36, 10, mol.n_atoms, 3) and run.cvs.shape == (2, 36, 10)
    assert 0.6 < run.md_acceptance < 1.0 and min(run.exchange_acceptance) > 0
    traj = mdtraj.Trajectory(run.xyz.reshape(-1, mol.n_atoms, 3), mol.mdtraj_topology())
    np.testing.assert_allclose(mdtraj.compute_dihedrals(traj, [phi, psi]).T.reshape(2, 36, 10), run.cvs, atol=1e-4)
    deviation = np.abs((run.cvs - centers.T[:, :, None] + np.pi) % (2 * np.pi) - np.pi)
    assert deviation.mean() < 0.3 and deviation.mean(2).max() < 0.8, deviation.mean(2)


def test_bad_settings_and_grids_are_refused():
    mol = load_system("double_well")
    bias = UmbrellaBias("position", [0], [-1.0, 1.0], 5.0)
    with pytest.raises(ValueError, match="one bias per grid axis"):
        run_exchange_umbrella(mol, bias, (2, 1), progress=False)
    with pytest.raises(ValueError, match="one finite centre per replica"):
        run_exchange_umbrella(mol, bias, (3,), progress=False)
    with pytest.raises(ValueError, match="timestep"):
        run_exchange_umbrella(mol, bias, (2,), ExchangeSettings(timestep=0.0), progress=False)
    with pytest.raises(ValueError, match="starts"):
        run_exchange_umbrella(mol, bias, (2,), starts=np.zeros((1, 2, 3)), progress=False)

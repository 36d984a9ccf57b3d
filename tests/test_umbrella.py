"""Umbrella sampling: per-replica harmonic biases in run_md, MBAR analysis against exact answers."""
import mdtraj
import numpy as np
import pytest

from openmm_snf import load_system
from openmm_snf.analysis import AnalysisError, EmptyStateError
from openmm_snf.analysis.umbrella import umbrella_mbar
from openmm_snf.md import MDSettings, UmbrellaBias, run_md

GRID = np.linspace(-4.0, 4.0, 400001)
U_WELL = GRID ** 4 - 6 * GRID ** 2 - 0.5 * GRID   # the shipped double well along x, in kT


def exact_delta_f(threshold: float = 0.0) -> float:
    """F(x > threshold) - F(x < threshold) of the double well by quadrature (-1.6906 kT at 0)."""
    p = np.exp(-(U_WELL - U_WELL.min()))
    return float(-np.log(p[GRID > threshold].sum() / p[GRID < threshold].sum()))


def biased_samples(bias: UmbrellaBias, n: int, rng: np.random.Generator) -> np.ndarray:
    """(K, n) exact independent samples of x from every window's biased density (inverse CDF)."""
    rows = []
    for k in range(len(bias.centers)):
        u = U_WELL + bias.reduced_energies(GRID)[k]
        cdf = np.cumsum(np.exp(-(u - u.min())))
        rows.append(np.interp(rng.random(n), cdf / cdf[-1], GRID))
    return np.stack(rows)


def test_exact_value():
    assert exact_delta_f() == pytest.approx(-1.6906, abs=1e-4)


def test_mbar_on_exact_samples_matches_quadrature():
    # few wide windows beat many narrow ones: MBAR's error grows along the chain of windows
    bias = UmbrellaBias("position", [0], np.linspace(-1.0, 1.0, 5), 8.0)
    x = biased_samples(bias, 2000, np.random.default_rng(1))
    analysis = umbrella_mbar(x, bias, decorrelate=False)
    result = analysis.delta_f(x.reshape(-1) > 0, x.reshape(-1) < 0, labels=("right", "left"))
    assert abs(result.delta_f - exact_delta_f()) < 4 * result.std
    assert 0.01 < result.std < 0.12
    assert result.ci_low < result.delta_f < result.ci_high
    # per-frame weights: normalized, and they reproduce the exact population and mean of x
    weights = np.exp(analysis.log_weights)
    assert weights.sum() == pytest.approx(1.0)
    p_right = 1 / (1 + np.exp(exact_delta_f()))
    assert result.population_a == pytest.approx(p_right, abs=0.02)
    p = np.exp(-(U_WELL - U_WELL.min()))
    assert np.sum(weights * x.reshape(-1)) == pytest.approx(np.sum(p * GRID) / p.sum(), abs=0.05)
    assert np.all(analysis.statistical_inefficiency == 1.0) and analysis.kept.all()


def test_mbar_on_umbrella_md_of_shipped_double_well():
    """The MD path end to end: position bias in the replicated Context, decorrelation, MBAR."""
    mol = load_system("double_well")
    centers = np.linspace(-1.5, 1.5, 7)
    bias = UmbrellaBias("position", [0], centers, 15.0)   # k > 12: even the middle window is unimodal
    starts = [[[c, 0.0, 0.0]] for c in centers]
    frames = run_md(mol, MDSettings(n_frames=4000, steps_per_frame=10, n_replicas=len(centers), timestep=5.0,
                                    friction=5.0, equilibration_steps=500, starts=starts, seed=3),
                    bias=bias, progress=False)
    x = frames[:, :, 0, 0]
    # the windows are ordered along x (the weak bias tilts the double well window by window)
    assert np.all(np.diff(x.mean(1)) > 0.1)
    analysis = umbrella_mbar(x, bias)
    assert np.all(analysis.statistical_inefficiency >= 1.0)
    result = analysis.delta_f(x.reshape(-1) > 0, x.reshape(-1) < 0)
    assert abs(result.delta_f - exact_delta_f()) < 4 * result.std
    assert result.std < 0.4   # ~0.25 at this length (statistical inefficiencies 5-17 frames)


def test_dihedral_bias_holds_alanine_dipeptide_windows():
    mol = load_system("alanine_dipeptide_vacuum")
    centers = [-2.0, 1.0]
    phi_atoms = mol.cvs["phi"]["atoms"]
    bias = UmbrellaBias("dihedral", phi_atoms, centers, 200.0)
    frames = run_md(mol, MDSettings(n_frames=40, steps_per_frame=25, n_replicas=2, equilibration_steps=500,
                                    temperature=300.0), bias=bias, progress=False)
    top = mol.mdtraj_topology()
    for k, center in enumerate(centers):
        phi = mdtraj.compute_dihedrals(mdtraj.Trajectory(frames[k].astype(np.float32), top), [phi_atoms])[:, 0]
        deviation = bias.deviation(phi)[k]
        assert abs(deviation.mean()) < 0.1 and deviation.std() < 0.2   # sigma ~ 1/sqrt(200) = 0.07
    # two biases at once: each replica held at its own (phi, psi) centre
    psi_atoms = mol.cvs["psi"]["atoms"]
    grid = (bias, UmbrellaBias("dihedral", psi_atoms, [2.5, -0.5], 200.0))
    frames = run_md(mol, MDSettings(n_frames=40, steps_per_frame=25, n_replicas=2, equilibration_steps=500,
                                    temperature=300.0), bias=grid, progress=False)
    for k in range(2):
        values = mdtraj.compute_dihedrals(mdtraj.Trajectory(frames[k].astype(np.float32), top), [phi_atoms, psi_atoms])
        for column, one in enumerate(grid):
            deviation = one.deviation(values[:, column])[k]
            assert abs(deviation.mean()) < 0.1 and deviation.std() < 0.2
    # periodic deviation: pi and -pi are the same angle
    np.testing.assert_allclose(UmbrellaBias("dihedral", phi_atoms, [np.pi], 1.0).deviation([-np.pi + 0.1]),
                               [[0.1]], atol=1e-12)


def test_mbar_on_a_grid_of_windows_over_two_cvs():
    """Windows on a 3 x 3 grid over x and y of two independent double wells (u(x) + u(y)): the biases add,
    MBAR sees their sum, and both marginal free energies come out exact; decorrelation reads each window's
    own bias energy."""
    axis = np.linspace(-1.0, 1.0, 3)
    centers = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    biases = tuple(UmbrellaBias("position", [0], centers[:, column], 8.0) for column in range(2))
    rng = np.random.default_rng(2)
    x, y = (biased_samples(one, 1500, rng) for one in biases)  # separable: each axis sampled on its own
    analysis = umbrella_mbar((x, y), biases, decorrelate=False)
    for values in (x, y):
        result = analysis.delta_f(values.reshape(-1) > 0, values.reshape(-1) < 0)
        assert abs(result.delta_f - exact_delta_f()) < 4 * result.std and result.std < 0.12
    independent = umbrella_mbar((x, y), biases)  # independent samples: g near 1, most frames kept
    assert independent.statistical_inefficiency.max() < 3 and independent.kept.mean() > 0.5
    with pytest.raises(AnalysisError, match="one cv array per bias"):
        umbrella_mbar((x,), biases)
    with pytest.raises(AnalysisError, match="differ in shape"):
        umbrella_mbar((x, y[:, :100]), biases)


def test_bias_validation():
    mol = load_system("alanine_dipeptide_vacuum")
    settings = MDSettings(n_frames=1, steps_per_frame=1, n_replicas=2, equilibration_steps=0)
    with pytest.raises(ValueError, match="one finite centre per replica"):
        run_md(mol, settings, bias=UmbrellaBias("dihedral", [4, 6, 8, 14], [0.0], 10.0), progress=False)
    with pytest.raises(ValueError, match="needs 4 atom indices"):
        run_md(mol, settings, bias=UmbrellaBias("dihedral", [4, 6, 8], [0.0, 1.0], 10.0), progress=False)
    with pytest.raises(ValueError, match="translation invariant"):
        run_md(mol, settings, bias=UmbrellaBias("position", [0], [0.0, 1.0], 10.0), progress=False)
    with pytest.raises(ValueError, match="force_constant"):
        run_md(mol, settings, bias=UmbrellaBias("dihedral", [4, 6, 8, 14], [0.0, 1.0], -1.0), progress=False)


def test_analysis_errors():
    bias = UmbrellaBias("position", [0], [-1.0, 1.0], 10.0)
    with pytest.raises(AnalysisError, match="one row per window"):
        umbrella_mbar(np.zeros((3, 10)), bias)
    x = biased_samples(bias, 200, np.random.default_rng(0))
    analysis = umbrella_mbar(x, bias, decorrelate=False)
    with pytest.raises(EmptyStateError, match="'far'"):
        analysis.delta_f(x.reshape(-1) > 10, x.reshape(-1) < 0, labels=("far", "left"))
    with pytest.raises(AnalysisError, match="400"):
        analysis.delta_f(np.ones(3, bool), np.ones(3, bool))

"""BlockMBAR against pymbar 4 on the same reduced energies: free energies, their errors, the overlap matrix
and region free energies with their uncertainty agree to solver precision; an unsampled state is solved too."""
import contextlib
import io

import numpy as np
import pytest

from openmm_snf.analysis import mbar
from openmm_snf.analysis.mbar import BlockMBAR

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    import pymbar


def umbrella_problem(seed: int = 0):
    """Harmonic windows along x of the double well u(x) = x^4 - 6x^2 - x/2, exact samples by inverse CDF;
    window 3 has none."""
    rng = np.random.default_rng(seed)
    centers, kappa = np.linspace(-1.5, 1.5, 12), 10.0
    grid = np.linspace(-4, 4, 20001)
    u_grid = grid**4 - 6 * grid**2 - 0.5 * grid
    n_k = rng.integers(50, 400, len(centers))
    n_k[3] = 0
    xs = []
    for center, n in zip(centers, n_k):
        u = u_grid + 0.5 * kappa * (grid - center) ** 2
        cdf = np.cumsum(np.exp(-(u - u.min())))
        xs.append(np.interp(rng.random(n), cdf / cdf[-1], grid))
    x = np.concatenate(xs)
    return x, 0.5 * kappa * (x[None, :] - centers[:, None]) ** 2, n_k


def test_block_mbar_matches_pymbar(monkeypatch):
    monkeypatch.setattr(mbar, "_BLOCK_ENTRIES", 12 * 100)  # many blocks of 100 samples even on this problem
    x, u_kn, n_k = umbrella_problem()
    reference = pymbar.MBAR(u_kn, n_k, initialize="zeros")
    differences = reference.compute_free_energy_differences()
    ours = BlockMBAR(lambda indices: u_kn[:, indices], n_k)
    assert ours._block == 100
    np.testing.assert_allclose(ours.f_k, reference.f_k, atol=1e-7)
    np.testing.assert_allclose(ours.free_energy_errors(), differences["dDelta_f"][0], atol=1e-7)
    np.testing.assert_allclose(ours.overlap_matrix(), reference.compute_overlap()["matrix"], atol=1e-7)
    masks = np.stack([x > 0, x < 0])
    perturbed = reference.compute_perturbed_free_energies(np.where(masks, 0.0, np.inf))
    f_r, theta = ours.region_free_energies(masks)
    assert f_r[0] - f_r[1] == pytest.approx(perturbed["Delta_f"][1, 0], abs=1e-7)
    assert np.sqrt(theta[0, 0] + theta[1, 1] - 2 * theta[0, 1]) == pytest.approx(perturbed["dDelta_f"][1, 0],
                                                                                   rel=1e-6)


def test_block_mbar_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative counts"):
        BlockMBAR(lambda indices: np.zeros((2, len(indices))), [0, 0])
    with pytest.raises(ValueError, match="expected"):
        BlockMBAR(lambda indices: np.zeros((3, len(indices))), [5, 5])
    ours = BlockMBAR(lambda indices: np.zeros((2, len(indices))), [5, 5])
    np.testing.assert_allclose(ours.f_k, 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="masks must have shape"):
        ours.region_free_energies(np.ones((2, 3), dtype=bool))

"""Free-energy differences, bootstrap intervals, profiles and KL divergences against known answers.

Synthetic weighted data: samples x ~ q = N(0, 2^2) with log weights log p(x) - log q(x) for the target
p = N(0.5, 1); the states A: x < 0 and B: x > 0 then have F_A - F_B = -ln(Phi(-0.5) / Phi(0.5)) exactly.
"""
import json
import math

import mdtraj
import numpy as np
import pytest
from scipy.stats import norm

from openmm_snf.analysis import (AnalysisError, EmptyStateError, free_energy_difference, free_energy_profile,
                                 histogram_kl_divergence, state_free_energy)
from openmm_snf.analysis.free_energy import bootstrap_indices
from openmm_snf.systems import load_system

MU, SIGMA_Q = 0.5, 2.0
EXACT = -math.log(norm.cdf(-MU) / norm.sf(-MU))


def weighted_gaussian(n, seed):
    """Samples of q = N(0, 2^2) and log weights towards p = N(0.5, 1), with an arbitrary offset."""
    x = np.random.default_rng(seed).normal(0.0, SIGMA_Q, n)
    return x, norm.logpdf(x, MU, 1.0) - norm.logpdf(x, 0.0, SIGMA_Q) + 123.4


def test_delta_f_matches_the_exact_value():
    x, log_w = weighted_gaussian(20000, seed=0)
    result = free_energy_difference(log_w, x < 0, x > 0, kT=2.5, n_bootstrap=500, seed=1)
    assert abs(result.delta_f - EXACT) < 4 * result.std
    assert result.ci_low < EXACT < result.ci_high
    assert result.ci_low < result.delta_f < result.ci_high
    assert result.std < 0.05
    assert result.population_a == pytest.approx(norm.cdf(-MU), abs=5 * result.std * 0.3)
    assert result.n_a + result.n_b == result.n_total == 20000
    assert 0 < result.ess_a < result.n_a and 0 < result.ess_b < result.n_b
    assert result.delta_f_kj_per_mol == pytest.approx(2.5 * result.delta_f)
    assert result.ci_kj_per_mol == pytest.approx((2.5 * result.ci_low, 2.5 * result.ci_high))
    record = json.loads(json.dumps(result.to_dict()))
    assert record["delta_f_kj_per_mol"] == pytest.approx(2.5 * result.delta_f)
    assert "kJ/mol" in result.summary() and "ESS A" in result.summary()


def test_bootstrap_interval_has_its_coverage_and_width():
    estimates, stds, covered = [], [], 0
    for seed in range(40):
        x, log_w = weighted_gaussian(2000, seed=100 + seed)
        result = free_energy_difference(log_w, x < 0, x > 0, n_bootstrap=300, seed=seed)
        estimates.append(result.delta_f)
        stds.append(result.std)
        covered += result.ci_low <= EXACT <= result.ci_high
    assert covered >= 34  # nominal 95% of 40 = 38; P(< 34) is about 0.5%
    assert np.std(estimates) == pytest.approx(np.mean(stds), rel=0.3)
    assert abs(np.mean(estimates) - EXACT) < 4 * np.std(estimates) / math.sqrt(40)


def test_pymbar_exp_cross_check():
    x, log_w = weighted_gaussian(5000, seed=3)
    result = free_energy_difference(log_w, x < 0, x > 0, n_bootstrap=200)
    assert result.exp_delta_f == pytest.approx(result.delta_f, abs=1e-10)
    assert 0.5 < result.exp_std / result.std < 2.0


def test_equal_weights_give_the_count_ratio_and_are_seeded():
    x = np.random.default_rng(4).normal(size=1000)
    result = free_energy_difference(np.zeros(1000), x < -0.5, x > -0.5, n_bootstrap=100, seed=7)
    assert result.delta_f == pytest.approx(-math.log(np.sum(x < -0.5) / np.sum(x > -0.5)), abs=1e-12)
    assert result.ess_a == pytest.approx(result.n_a)
    again = free_energy_difference(np.zeros(1000), x < -0.5, x > -0.5, n_bootstrap=100, seed=7)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    assert result.kT is None
    with pytest.raises(ValueError, match="kT"):
        result.delta_f_kj_per_mol


def test_empty_state_is_an_error():
    x, log_w = weighted_gaussian(100, seed=5)
    with pytest.raises(EmptyStateError, match=r"state 'far' has no samples among 100 frames"):
        free_energy_difference(log_w, x > 50, x < 0, labels=("far", "left"))


def test_states_with_the_same_label_are_an_error():
    in_a = np.arange(20) >= 10
    with pytest.raises(AnalysisError, match="both states are labelled 'A'"):
        free_energy_difference(np.zeros(20), in_a, ~in_a, labels=("A", "A"))


def test_sparse_state_reports_degenerate_replicates():
    log_w = np.zeros(20)
    in_a = np.arange(20) == 3
    result = free_energy_difference(log_w, in_a, ~in_a, n_bootstrap=200)
    assert result.n_bootstrap_degenerate > 20  # a replicate misses frame 3 with probability 0.36
    assert result.ci_high == math.inf and result.std == math.inf


def test_block_bootstrap_widens_intervals_for_correlated_frames():
    rng = np.random.default_rng(6)
    n, rho = 4000, 0.98
    series = np.empty(n)
    series[0] = 0.0
    for t in range(1, n):
        series[t] = rho * series[t - 1] + math.sqrt(1 - rho ** 2) * rng.normal()
    iid = free_energy_difference(np.zeros(n), series < 0.3, series > 0.3, n_bootstrap=300)
    blocks = free_energy_difference(np.zeros(n), series < 0.3, series > 0.3, n_bootstrap=300, block_length=200)
    assert blocks.std > 3 * iid.std


def test_bootstrap_indices_are_contiguous_blocks():
    index = bootstrap_indices(10, 4, np.random.default_rng(0), block_length=3)
    assert index.shape == (4, 10) and index.min() >= 0 and index.max() <= 9
    assert np.all(np.diff(index[:, :3], axis=1) == 1)
    with pytest.raises(ValueError, match="block_length"):
        bootstrap_indices(10, 4, np.random.default_rng(0), block_length=11)


def test_state_free_energy_on_a_trajectory():
    mol = load_system("double_well")
    rng = np.random.default_rng(8)
    xyz = rng.normal(0, 1.5, (3000, 1, 3))
    log_w = -0.3 * xyz[:, 0, 0]
    traj = mdtraj.Trajectory(xyz, mol.mdtraj_topology())
    x = traj.xyz[:, 0, 0].astype(np.float64)
    result = state_free_energy(traj, log_w, "left: x < 0", "right: x > 0", cvs=mol.cvs, kT=mol.kT, n_bootstrap=50)
    direct = free_energy_difference(log_w, x < 0, x > 0, n_bootstrap=50)
    assert (result.label_a, result.label_b) == ("left", "right")
    assert result.delta_f == pytest.approx(direct.delta_f, abs=1e-12)
    assert result.kT == pytest.approx(mol.kT)
    with pytest.raises(EmptyStateError, match=r"state 'far: x > 100' has no samples among 3000 frames \(the data "
                                              r"have x in \[-?\d"):
        state_free_energy(traj, log_w, "left: x < 0", "far: x > 100", cvs=mol.cvs)


def test_profile_1d_matches_the_exact_density():
    x, log_w = weighted_gaussian(20000, seed=9)
    edges = np.linspace(-3, 3, 31)
    profile = free_energy_profile(x, log_w, bins=30, limits=(-3, 3), n_bootstrap=200, seed=2)
    np.testing.assert_allclose(profile.edges[0], edges)
    assert profile.n_outside == np.sum(np.abs(x) > 3)
    assert profile.counts.sum() + profile.n_outside == 20000
    assert np.nanmin(profile.free_energy) == 0.0
    exact_p = np.diff(norm.cdf(edges, MU, 1.0))
    estimate_p = np.exp(-profile.free_energy) / np.exp(-profile.free_energy).sum()
    central = exact_p > 0.01
    z = (np.log(estimate_p) - np.log(exact_p / exact_p.sum()))[central] / profile.std[central]
    assert np.all(np.abs(z) < 4.5)
    shift = -np.log(estimate_p.max())
    exact_f = -np.log(exact_p / exact_p.sum()) - shift
    inside = (profile.lower <= exact_f) & (exact_f <= profile.upper)
    assert inside[central].mean() > 0.75


def test_profile_2d_of_independent_cvs_is_additive():
    rng = np.random.default_rng(10)
    values = rng.normal(size=(40000, 2)) * [0.8, 1.2]
    profile = free_energy_profile(values, None, bins=12, n_bootstrap=20)
    assert profile.free_energy.shape == profile.std.shape == profile.upper.shape == (12, 12)
    fx = free_energy_profile(values[:, 0], None, bins=12, n_bootstrap=0).free_energy
    fy = free_energy_profile(values[:, 1], None, bins=12, n_bootstrap=0).free_energy
    expected = fx[:, None] + fy[None, :]
    populated = profile.counts > 200
    offset = np.mean((profile.free_energy - expected)[populated])
    assert np.all(np.abs(profile.free_energy - expected - offset)[populated] < 5 * profile.std[populated] + 0.02)
    assert np.all(np.isinf(profile.free_energy[profile.counts == 0]))


def test_angles_at_pi_land_in_the_last_bin():
    profile = free_energy_profile(np.array([-math.pi, math.pi, 0.0]), None, bins=4, n_bootstrap=0)
    assert profile.counts.tolist() == [1, 0, 1, 1] and profile.n_outside == 0


def test_kl_divergence():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, 100000), rng.normal(0.5, 1, 100000)
    assert histogram_kl_divergence(a, a, limits=(-5, 5)) == pytest.approx(0.0, abs=1e-12)
    assert histogram_kl_divergence(a, b, limits=(-5, 5)) == pytest.approx(0.125, abs=0.01)  # MU^2 / 2
    x, log_w = weighted_gaussian(100000, seed=12)
    target = rng.normal(MU, 1.0, 100000)
    reweighted = histogram_kl_divergence(target, x, log_weights=log_w, limits=(-5, 5))
    raw = histogram_kl_divergence(target, x, limits=(-5, 5))
    assert reweighted < 0.01 < 0.2 < raw
    c, d = rng.normal(size=(2, 100000))
    two_d = histogram_kl_divergence(np.c_[a, c], np.c_[b, d], bins=16, limits=(-5, 5))
    assert two_d == pytest.approx(0.125, abs=0.02)


def test_double_well_through_weighted_files(tmp_path):
    """Importance samples of the shipped double well, written and read back, give the quadrature answer."""
    from scipy.integrate import quad

    from openmm_snf.io import read_weighted_trajectory, write_weighted_trajectory

    def u_x(x):
        return x ** 4 - 6 * x ** 2 - 0.5 * x

    mol = load_system("double_well")
    rng = np.random.default_rng(13)
    xyz = rng.normal(0.0, 1.0, (6000, 1, 3))
    xyz[:, 0, 0] *= 1.5  # proposal N(0, 1.5^2) along x; y and z already follow the target
    x = xyz[:, 0, 0]
    log_w = -u_x(x) - norm.logpdf(x, 0.0, 1.5)
    energies = u_x(x) + 0.5 * (xyz[:, 0, 1] ** 2 + xyz[:, 0, 2] ** 2)
    write_weighted_trajectory(tmp_path / "dw.dcd", mol, xyz, log_w, energies)
    loaded = read_weighted_trajectory(tmp_path / "dw.dcd")
    result = state_free_energy(loaded.traj, loaded.log_weights, "A: x < 0", "B: x > 0", cvs=mol.cvs, kT=mol.kT,
                               n_bootstrap=300)
    left, right = (quad(lambda s: math.exp(-u_x(s)), *limits)[0] for limits in ((-np.inf, 0), (0, np.inf)))
    exact = -math.log(left / right)
    assert result.ci_low < exact < result.ci_high
    assert abs(result.delta_f - exact) < 4 * result.std < 0.4

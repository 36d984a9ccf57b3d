"""Pareto k-hat against known tails, and the reliability verdict on good and failing weights (float64, seeded)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from openmm_snf.analysis import default_states, diagnose, free_energy_difference
from openmm_snf.analysis.diagnostics import MORE_TRAINING, data_advice
from openmm_snf.weights import _gpd_shape, pareto_khat

N_SEEDS = 20


def _khat_of_gpd(xi: float, n: int, seed: int) -> float:
    weights = stats.genpareto.rvs(xi, size=n, random_state=np.random.default_rng(seed))
    return pareto_khat(np.log(weights))


@pytest.mark.parametrize("xi", [0.3, 0.8])
def test_khat_recovers_the_shape_of_a_pareto_tail(xi):
    """Weights drawn from a GPD of shape xi: the mean k-hat over seeds is xi, shrunk as PSIS's prior says."""
    n = 4000
    n_tail = math.ceil(min(n / 5, 3 * math.sqrt(n)))
    expected = (n_tail * xi + 10 * 0.5) / (n_tail + 10)
    k = np.array([_khat_of_gpd(xi, n, seed) for seed in range(N_SEEDS)])
    standard_error = k.std(ddof=1) / math.sqrt(N_SEEDS)
    assert abs(k.mean() - expected) < 4 * standard_error + 0.01, (k.mean(), expected, standard_error)
    # each single estimate within 5 asymptotic standard deviations (1 + xi) / sqrt(M)
    assert np.all(np.abs(k - expected) < 5 * (1 + xi) / math.sqrt(n_tail)), k


def test_zhang_stephens_fit_agrees_with_maximum_likelihood():
    """The empirical-Bayes shape and scipy's maximum-likelihood shape converge to the same value."""
    x = stats.genpareto.rvs(0.4, scale=2.0, size=5000, random_state=np.random.default_rng(1))
    mle_shape, _, _ = stats.genpareto.fit(x, floc=0)
    assert abs(_gpd_shape(x) - mle_shape) < 4 * 1.4 / math.sqrt(len(x))
    assert abs(_gpd_shape(x) - 0.4) < 4 * 1.4 / math.sqrt(len(x))


def test_khat_of_light_and_bounded_tails():
    rng = np.random.default_rng(2)
    light = [pareto_khat(rng.normal(0.0, 0.1, 4000)) for _ in range(N_SEEDS)]
    assert np.mean(light) < 0.1 and max(light) < 0.35, light  # Gaussian log weights of small variance: ~0
    uniform = pareto_khat(np.log(rng.uniform(size=4000)))  # bounded weights: GPD shape -1
    assert -1.3 < uniform < -0.6
    heavy = pareto_khat(rng.normal(0.0, 3.0, 4000))  # log-normal weights with sigma = 3: far too heavy
    assert heavy > 0.7
    # a constant shift of the log weights changes nothing, also when it is huge
    lw = rng.normal(0.0, 1.0, 1000)
    assert pareto_khat(lw + 5000.0) == pytest.approx(pareto_khat(lw), abs=1e-12)


def test_khat_edge_cases():
    assert pareto_khat(np.zeros(1000)) == -math.inf  # equal weights: no tail at all
    assert math.isnan(pareto_khat(np.zeros(20)))  # too few samples to fit
    lw = np.random.default_rng(3).normal(size=500)
    assert pareto_khat(np.append(lw, [np.nan, -np.inf])) == pytest.approx(pareto_khat(lw))


def test_exact_sampler_is_reliable():
    x = np.random.default_rng(4).normal(size=5000)
    states = {"x<0": x < 0, "x>0": x > 0}
    for log_w in (np.zeros(5000), np.random.default_rng(5).normal(0.0, 0.2, 5000)):
        verdict = diagnose(log_w, states)
        assert verdict.reliable, verdict.reasons
        assert verdict.lines()[0].startswith("reliable:") and len(verdict.lines()) == 1
        assert [s.label for s in verdict.states] == ["x<0", "x>0"]
        assert verdict.states[0].population == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(5000) + 0.01)
    assert diagnose(np.zeros(5000)).summary().startswith("Kish ESS 5000.0 (100.00% of 5000)")


def test_a_state_with_infinite_variance_weights_passes_with_a_caution():
    """A state whose weights have a Pareto tail with k = 0.6 (infinite variance, still converging): reliable,
    with a caution line naming it; the same tail with k = 0.3 gets none."""
    rng = np.random.default_rng(8)
    rare = np.arange(20000) < 2000
    for k, cautioned in ((0.6, True), (0.3, False)):
        log_w = np.where(rare, -k * np.log(rng.uniform(size=20000)), 0.0)  # w = U^-k: Pareto tail, shape k
        verdict = diagnose(log_w, {"A": ~rare, "B": rare})
        assert verdict.reliable and (0.5 < verdict.states[1].k_hat <= 0.7) == cautioned, verdict.states[1]
        lines = verdict.lines()
        assert lines[0].startswith("reliable:") and len(lines) == 1 + cautioned, lines
        if cautioned:
            assert lines[1].startswith("caution: state B has k-hat 0.") and "--seed" in lines[1]
            assert verdict.to_dict()["cautions"] == [lines[1][len("caution: "):]]


def test_a_sampler_that_missed_a_state_is_flagged():
    """All samples in the left well with near-equal weights: Kish ESS is excellent, the state count is not."""
    rng = np.random.default_rng(6)
    x = rng.normal(-1.7, 0.3, 4000)
    verdict = diagnose(rng.normal(0.0, 0.1, 4000), {"x<0": x < 0, "x>0": x > 0})
    assert verdict.ess_fraction > 0.9 and not verdict.reliable
    assert verdict.states[1].n == 0
    (line,) = verdict.lines()
    assert line.startswith("UNRELIABLE: state x>0 has no samples; the sampler never proposed x>0")


def test_heavy_weights_and_rare_states_are_flagged():
    rng = np.random.default_rng(7)
    heavy = diagnose(rng.normal(0.0, 4.0, 4000))  # an under-trained model's spread of log weights
    assert not heavy.reliable and heavy.k_hat > 0.7 and heavy.ess_fraction < 0.01
    assert len(heavy.lines()) == 1 and " and Pareto k-hat" in heavy.lines()[0]  # one advice, one line
    rare = np.zeros(4000, dtype=bool)
    rare[:12] = True
    verdict = diagnose(np.zeros(4000), {"A": ~rare, "B": rare})
    assert not verdict.reliable and verdict.reasons == ("state B has ESS 12.0 from 12 samples (< 30)",)
    assert verdict.advice[0].startswith("draw about 15000 samples (--n 15000)")  # 1.5 x 4000 x 30 / 12
    assert "rarely proposes" in diagnose(np.zeros(4000), {"A": np.arange(4000) > 0, "B": np.arange(4000) == 0}).advice[0]
    # a state whose own weights are heavy-tailed while the overall weights (dominated by the other) look fine
    log_w = np.concatenate([rng.normal(0.0, 0.1, 8000), rng.normal(-20.0, 3.0, 2000)])
    in_b = np.arange(10000) >= 8000
    verdict = diagnose(log_w, {"A": ~in_b, "B": in_b})
    assert verdict.k_hat < 0.5 and verdict.ess_fraction > 0.5 and not verdict.reliable
    assert verdict.states[1].k_hat > 0.7 and verdict.reasons[0].startswith("state B has ")
    assert "Pareto k-hat" in verdict.reasons[0] and verdict.advice[0] == MORE_TRAINING  # not "draw more samples"
    half = np.arange(4000) < 2000
    everywhere = diagnose(rng.normal(0.0, 4.0, 4000), {"A": half, "B": ~half})
    assert len(everywhere.lines()) == 1  # heavy overall and in every state: one line, the sampler's remedy
    bad = np.zeros(100)
    bad[[3, 9]] = [np.nan, np.inf]
    verdict = diagnose(bad)
    assert not verdict.reliable and verdict.n_nonfinite == 2 and "first at frame 3" in verdict.reasons[0]


def test_frames_made_without_a_flow_get_advice_about_their_own_sampler():
    """Umbrella (N_k in the sidecar) and tempering (temperatures) frames: no 'train longer', no '--n'."""
    assert data_advice({}) == {} and data_advice({"kT": 2.5}) == {}
    umbrella, tempering = data_advice({"N_k": np.ones(4)}), data_advice({"temperatures": np.ones(4)})
    assert "--windows" in umbrella["remedy"] and "'openmm-snf md' longer" in tempering["remedy"]
    rng = np.random.default_rng(3)
    heavy = diagnose(rng.normal(0.0, 4.0, 4000), **umbrella)
    assert not heavy.reliable and heavy.advice == (umbrella["remedy"],) * len(heavy.reasons)
    rare = np.arange(4000) < 12
    for few in (rare, np.arange(4000) == 0):  # sound weights, few samples: within reach or far off
        verdict = diagnose(np.zeros(4000), {"A": ~few, "B": few}, **tempering)
        assert verdict.advice == (tempering["more"],) and "train" not in verdict.lines()[0]
    assert "--n" not in " ".join(diagnose(np.zeros(12), **umbrella).advice)
    empty = {"A": np.ones(4000, bool), "B": np.zeros(4000, bool)}  # a state without frames: no training advice
    assert "training data" in " ".join(diagnose(np.zeros(4000), empty).advice)
    for advice, fix in ((umbrella, "--cv"), (tempering, "--max-temperature")):
        verdict = diagnose(np.zeros(4000), empty, **advice)
        assert verdict.advice == (advice["missing"],) and fix in advice["missing"]
        assert "train" not in advice["missing"] and "state B has no samples" in verdict.reasons


def test_verdict_json_is_strict():
    verdict = diagnose(np.zeros(10), {"A": np.ones(10, bool), "B": np.zeros(10, bool)})
    text = json.dumps(verdict.to_dict(), allow_nan=False)
    assert json.loads(text)["k_hat"] is None and json.loads(text)["reliable"] is False


def test_free_energy_in_log_space_and_strict_json():
    """A state 1000 kT below the other: exact and finite (linear-space sums underflow to log 0 = -inf)."""
    n = 2000
    in_b = np.arange(n) % 4 == 0
    log_w = np.where(in_b, -1000.0, 0.0)
    result = free_energy_difference(log_w, ~in_b, in_b, n_bootstrap=200)
    assert result.delta_f == pytest.approx(-1000.0 + math.log(in_b.sum() / (~in_b).sum()), abs=1e-9)
    assert math.isfinite(result.ci_low) and math.isfinite(result.ci_high)
    assert result.verdict.reliable and result.population_b == pytest.approx(math.exp(-1000.0) / 3, rel=1e-9)
    # a state with two samples: some bootstrap replicates miss it; the interval is unbounded, JSON says null
    few = np.zeros(n, dtype=bool)
    few[:2] = True
    result = free_energy_difference(np.zeros(n), ~few, few, n_bootstrap=200)
    assert result.n_bootstrap_degenerate > 0 and not result.verdict.reliable
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["ci_low"] is None and data["verdict"]["reliable"] is False
    assert "unbounded" in result.summary() and "inf" not in result.summary()


def test_default_states():
    import mdtraj
    from openmm_snf.systems import load_system
    double_well = load_system("double_well")
    traj = mdtraj.Trajectory(np.array([[[-1.0, 0, 0]], [[1.0, 0, 0]], [[2.0, 0, 0]]]),
                             mdtraj.Topology.from_openmm(double_well.topology))
    states = default_states(traj, double_well.cvs)
    assert list(states) == ["x<0", "x>0"] and states["x>0"].tolist() == [False, True, True]
    aldp = load_system("alanine_dipeptide_vacuum")
    traj = mdtraj.Trajectory(np.repeat(aldp.positions[None], 2, 0), mdtraj.Topology.from_openmm(aldp.topology))
    assert list(default_states(traj, aldp.cvs)) == ["phi<0", "phi>0"]
    assert list(default_states(traj)) == ["phi<0", "phi>0"]  # phi from the topology alone
    traj.topology.residue(1).name = "PRO"  # proline's ring fixes phi: phi > 0 is no state of it
    assert default_states(traj) == {}
    peptide = mdtraj.load(str(Path(__file__).parent / "data" / "ace_ser_phe_nme.pdb"))  # ACE-ALA-SER-PHE-NME
    states = default_states(peptide)
    assert list(states) == [f"phi[{residue}]{op}0" for residue in ("ALA2", "SER3", "PHE4") for op in "<>"]
    phi = mdtraj.compute_phi(peptide)[1][:, 1]
    np.testing.assert_array_equal(states["phi[SER3]>0"], phi > 0)

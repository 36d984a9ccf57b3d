"""Parallel tempering through the energy bridge: ladder, MBAR weights and exact double-well populations."""
import math

import numpy as np
import pytest

from openmm_snf.systems import load_system
from openmm_snf.tempering import TemperingSettings, default_ladder, mbar_log_weights, run_tempering
from openmm_snf.weights import normalized_weights

# fraction of the double well's Boltzmann mass at x > 0 (300 K), by quadrature
_GRID = np.linspace(-5, 5, 200001)
_U = _GRID**4 - 6 * _GRID**2 - 0.5 * _GRID
EXACT_RIGHT = float(np.exp(-(_U - _U.min()))[_GRID > 0].sum() / np.exp(-(_U - _U.min())).sum())


def test_default_ladder_is_geometric_and_sized_by_atoms():
    small = default_ladder(300.0, 750.0, n_atoms=1)
    large = default_ladder(300.0, 750.0, n_atoms=22)
    for ladder in (small, large):
        assert ladder[0] == 300.0 and ladder[-1] == pytest.approx(750.0)
        ratios = ladder[1:] / ladder[:-1]
        np.testing.assert_allclose(ratios, ratios[0])
    assert len(large) > len(small) >= 2  # more degrees of freedom, narrower energy overlap, more rungs
    assert len(default_ladder(300.0, 300.0, 22)) == 1
    np.testing.assert_allclose(default_ladder(300.0, 600.0, 22, n_temperatures=3), [300, 300 * 2**0.5, 600])
    with pytest.raises(ValueError, match="below"):
        default_ladder(300.0, 200.0, 5)


def test_mbar_weights_recover_the_target_temperature_from_pooled_rungs():
    """Exact draws of u0 = x²/2 (x ~ N(0, T/T0) at each rung): weighted <x²> at T0 is 1 within 5 sigma."""
    rng = np.random.default_rng(1)
    temperatures = np.array([300.0, 420.0, 600.0])
    n = 4000
    x = np.concatenate([rng.normal(0, math.sqrt(t / 300.0), n) for t in temperatures])
    index = np.repeat(np.arange(3), n)
    w = normalized_weights(mbar_log_weights(0.5 * x**2, index, temperatures))
    mean = float(np.sum(w * x**2))
    sigma = math.sqrt(float(np.sum(w**2 * (x**2 - mean) ** 2)))  # standard error of a weighted mean
    assert abs(mean - 1.0) < 5 * sigma, (mean, sigma)
    assert sigma < 0.03
    # the hot rungs contribute: weights are not those of rung 0 alone
    assert w[index > 0].sum() > 0.2
    # a negative control: the pooled frames unweighted are far from T0
    assert abs(np.mean(x**2) - 1.0) > 10 * sigma


def test_tempering_reproduces_the_double_well_populations():
    mol = load_system("double_well")
    settings = TemperingSettings(n_frames=500, steps_per_frame=20, n_ladders=16, max_temperature=900.0,
                                 timestep=5.0, friction=1.0, equilibration_steps=20000, seed=3)
    result = run_tempering(mol, settings, progress=False)
    assert len(result.temperatures) >= 2 and np.all((result.acceptance > 0.2) & (result.acceptance < 1))
    # each rung samples its own temperature: <y²> = T/T0 for u = ... + y²/2
    y2 = (result.xyz[..., 0, 1] ** 2).mean(axis=(0, 2))
    np.testing.assert_allclose(y2, result.temperatures / 300.0, rtol=0.08)
    # every replica started in the left well; the weighted pooled frames find the exact right-well mass
    w = normalized_weights(result.log_weights())
    right = float(w[result.frames()[:, 0, 0] > 0].sum())
    assert abs(right - EXACT_RIGHT) < 0.06, (right, EXACT_RIGHT)
    # negative control: plain MD (one rung) from the same start never leaves the left well
    plain = run_tempering(mol, TemperingSettings(**{**settings.__dict__, "n_temperatures": 1, "n_frames": 100,
                                                     "equilibration_steps": 0}),
                          progress=False)
    assert np.mean(plain.frames()[:, 0, 0] > 0) < 0.05


def test_settings_are_validated():
    for bad in ({"n_frames": 0}, {"timestep": -1.0}, {"max_temperature": float("nan")}, {"n_temperatures": 0},
                {"equilibration_steps": -5}, {"n_ladders": 2.5}):
        with pytest.raises(ValueError, match="tempering"):
            TemperingSettings(**bad).validate()


def test_rare_states_are_seeded_with_md_at_the_target_temperature():
    """A state below the balance share is represented by MD at T started in it: its old frames drop to weight
    zero, the new frames all lie in it and carry its weight, the other states are untouched."""
    from scipy.special import logsumexp
    from openmm_snf.config import resolve_config
    from openmm_snf.training_data import _seed_rare_states, frame_states
    mol = load_system("double_well")
    config = resolve_config({"source": "double_well"},
                            overrides={"data": {"seed_rare_states": {"n_copies": 4, "n_frames": 50}}})
    result = run_tempering(mol, TemperingSettings(**{**config["data"]["tempering"], "n_frames": 100,
                                                     "equilibration_steps": 4000}), progress=False)
    frames = result.frames()
    states = frame_states(mol, frames)
    log_w = np.where(states["x<0"], np.log(0.01), 0.0)  # the left well made rare
    left_weight = logsumexp(log_w[states["x<0"]])
    assert states["x<0"].any() and np.exp(left_weight - logsumexp(log_w)) < 0.1
    new_frames, new_log_w, new_states = _seed_rare_states(mol, config, frames, log_w, states, 0.1, False)
    n_old = len(frames)
    assert len(new_frames) > n_old and np.all(new_frames[n_old:, 0, 0] < 0)  # MD at 300 K stays in the left well
    assert np.all(np.isneginf(new_log_w[:n_old][states["x<0"]]))
    np.testing.assert_allclose(logsumexp(new_log_w[n_old:]), left_weight)
    np.testing.assert_array_equal(new_log_w[:n_old][states["x>0"]], log_w[states["x>0"]])
    assert np.all(new_states["x<0"][n_old:]) and not np.any(new_states["x>0"][n_old:])

"""sample_to_precision (``sample --n auto``): rounds until each state's ESS gives the wanted interval."""
from types import SimpleNamespace

import numpy as np
import pytest

from openmm_snf import sampling


class FakeSampler:
    """``sampling.sample`` stand-in: every ``period``-th sample (counted over all rounds) lies in the rare
    state A, all weights equal, so a state's ESS is its number of samples."""

    def __init__(self, period):
        self.period, self.drawn, self.calls = period, 0, []

    def __call__(self, run, n, *, seed, **kwargs):
        self.calls.append((n, seed))
        index = np.arange(self.drawn, self.drawn + n)
        self.drawn += n
        rare = (index % self.period == 0) if self.period else np.zeros(n, dtype=bool)
        xyz = np.where(rare, 1.0, -1.0)[:, None, None] * np.ones((n, 1, 3))
        return {"xyz": xyz, "log_weights": np.zeros(n), "reduced_energies": np.zeros(n),
                "acceptance": {"mc1": 0.5 if len(self.calls) == 1 else 0.2}}


@pytest.fixture
def fake(monkeypatch):
    def install(period):
        sampler = FakeSampler(period)
        monkeypatch.setattr(sampling, "sample", sampler)
        monkeypatch.setattr(sampling, "frame_states", lambda mol, xyz: {"A": xyz[:, 0, 0] > 0, "B": xyz[:, 0, 0] < 0})
        return sampler
    return install


RUN = SimpleNamespace(mol=None)


def test_rounds_stop_when_the_rare_state_reaches_the_wanted_ess(fake):
    sampler = fake(500)  # A: 60 of the first 30,000 samples
    lines = []
    result, stopped = sampling.sample_to_precision(RUN, 0.15, 240000, seed=7, report=lines.append,
                                                   clock=lambda: 0.02 * sampler.drawn)  # 20 ms per sample
    target = sampling.state_ess_for(0.15)
    assert target == pytest.approx((1.96 / 0.15) ** 2)
    # 1.1 * 30000 * 170.7 / 60 = 93,900 wanted: 70,000 more (steps of 10,000)
    assert [n for n, _ in sampler.calls] == [30000, 70000]
    assert [seed for _, seed in sampler.calls] == [7, sampling.round_seed(7, 1)] and sampler.calls[1][1] != 7
    assert len(result["log_weights"]) == 100000 and result["xyz"].shape == (100000, 1, 3)
    assert np.sum(result["xyz"][:, 0, 0] > 0) == 200 >= target
    assert result["acceptance"]["mc1"] == pytest.approx(0.3 * 0.5 + 0.7 * 0.2)
    assert "every state has ESS >= 171" in stopped
    assert lines == ["30000 samples: least ESS 60.0 (A; 171 wanted for ±0.15 kT): drawing 70000 more "
                     "(~23 min at the pace so far)"]


def test_rounds_stop_at_max_n(fake):
    sampler = fake(1000)
    result, stopped = sampling.sample_to_precision(RUN, 0.15, 100000, report=lambda line: None)
    assert [n for n, _ in sampler.calls] == [30000, 70000] and len(result["log_weights"]) == 100000
    assert stopped.endswith("stopped at --max-n 100000") and "least ESS 100.0 (A;" in stopped


def test_a_round_draws_at_most_three_times_the_samples_so_far(fake):
    sampler = fake(6000)  # A: 5 of the first 30,000 (an ESS estimate that says 1.1 million are needed)
    sampling.sample_to_precision(RUN, 0.15, 300000, report=lambda line: None)
    assert [n for n, _ in sampler.calls] == [30000, 90000, 180000]


def test_a_hopeless_sampler_stops_after_the_first_round(fake):
    """1 of 30,000 samples in A: ESS 171 would take ~5.6 million samples, over 4x --max-n: stop and say so."""
    sampler = fake(30000)
    _, stopped = sampling.sample_to_precision(RUN, 0.15, 240000, report=lambda line: None,
                                              clock=lambda: 0.02 * sampler.drawn)
    assert [n for n, _ in sampler.calls] == [30000]
    assert "over 4x --max-n: the sampler itself must get better" in stopped
    assert "~5,634,346 samples (~31.3 h)" in stopped  # 20 ms per sample


def test_a_state_without_samples_stops_after_the_first_round(fake):
    sampler = fake(0)
    result, stopped = sampling.sample_to_precision(RUN, 0.15, 240000, report=lambda line: None)
    assert [n for n, _ in sampler.calls] == [30000]
    assert "A has no samples" in stopped


def test_the_first_round_can_be_smaller(fake):
    """Many annealing stages cost more per sample: the CLI passes first_round(stages) as ``first``."""
    sampler = fake(3)
    _, stopped = sampling.sample_to_precision(RUN, 0.15, 240000, report=lambda line: None, first=7500)
    assert [n for n, _ in sampler.calls] == [7500] and stopped.startswith("7500 samples: every state")


def test_draw_anneals_then_sizes_the_first_round_by_the_stages(fake, monkeypatch):
    """draw (the CLI's and the API's path): annealing chosen first, its reason reported, then rounds whose
    first has first_round(stages) samples; a fixed n is drawn as asked."""
    sampler, annealed = fake(3), SimpleNamespace(mol=None)
    chosen = []

    def with_annealing(run, stages, **kwargs):
        chosen.append((stages, kwargs["seed"]))
        return (annealed, sampling.VERY_POOR_FLOW_STAGES, "pilot very poor") if stages == "auto" else (run, 0, None)

    monkeypatch.setattr(sampling, "with_annealing", with_annealing)
    lines = []
    drawn = sampling.draw(RUN, "auto", seed=5, report=lambda topic, line: lines.append((topic, line)))
    assert chosen == [("auto", 5)] and drawn.run is annealed and drawn.stages == 320
    assert [n for n, _ in sampler.calls] == [7500] and drawn.stopped.startswith("7500 samples: every state")
    assert len(drawn.samples["log_weights"]) == 7500 and lines == [("anneal", "pilot very poor")]
    drawn = sampling.draw(RUN, 1234, anneal=0)
    assert [n for n, _ in sampler.calls] == [7500, 1234] and drawn.stopped is None
    assert drawn.run is RUN and drawn.stages == 0 and len(lines) == 1


def test_one_round_when_every_state_is_precise_enough(fake):
    sampler = fake(3)
    result, stopped = sampling.sample_to_precision(RUN, 0.15, 240000, report=lambda line: None)
    assert [n for n, _ in sampler.calls] == [30000] and stopped.startswith("30000 samples: every state")


def test_heavy_tailed_weights_keep_sampling(monkeypatch):
    """Enough ESS on paper, but the rare state's weights have k-hat > 0.7: draw twice as many."""
    rng = np.random.default_rng(0)
    calls = []

    def heavy(run, n, *, seed, **kwargs):
        calls.append(n)
        log_w = np.where(np.arange(n) % 2 == 0, -0.9 * np.log(rng.uniform(size=n)), 0.0)  # Pareto tail, k = 0.9
        return {"xyz": np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None, None] * np.ones((n, 1, 3)),
                "log_weights": log_w, "reduced_energies": np.zeros(n), "acceptance": {}}

    monkeypatch.setattr(sampling, "sample", heavy)
    monkeypatch.setattr(sampling, "frame_states", lambda mol, xyz: {"A": xyz[:, 0, 0] > 0, "B": xyz[:, 0, 0] < 0})
    _, stopped = sampling.sample_to_precision(RUN, 1.0, 90000, report=lambda line: None)
    assert calls[:2] == [30000, 30000] and "k-hat > 0.7 in" in stopped


def test_round_seeds_are_distinct_and_deterministic():
    seeds = [sampling.round_seed(3, k) for k in range(5)]
    assert seeds[0] == 3 and len(set(seeds)) == 5 and seeds == [sampling.round_seed(3, k) for k in range(5)]
    assert all(0 <= s < 2**63 for s in seeds)

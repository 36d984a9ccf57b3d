"""Sampling a trained run: batches drawn in seeded shards (spread over ranks), and annealing chosen or applied.

``n`` samples are drawn in contiguous shards, each from its own generator, so equal (seed, n, batch_size,
n_shards) give equal samples on any number of ranks dividing n_shards (:mod:`openmm_snf.distributed`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .analysis.diagnostics import MAX_KHAT, diagnose
from .distributed import broadcast_from_main, gather_in_order, local_shards, rank_of, shard_seed, split_sizes, \
    world_size_of
from .flows.anneal import annealed
from .runs import Run
from .training_data import frame_states

__all__ = ["AUTO_ANNEAL_STAGES", "POOR_FLOW_STAGES", "Draw", "choose_annealing", "draw", "first_round", "sample",
           "sample_to_precision", "state_ess_for", "with_annealing"]


def sample(run: Run, n: int, *, seed: int = 0, batch_size: int = 1024, progress: bool = True,
           n_shards: int | None = None, process_group=None) -> dict | None:
    """Draw ``n`` samples in batches; return numpy arrays xyz (n, n_atoms, 3) nm, log_weights, reduced_energies
    (float64) and the mean Metropolis acceptance per block (over batches).

    ``n`` is drawn in ``n_shards`` contiguous shards (None: one per rank; 1 in a single process), shard k
    with its own generator (``distributed.shard_seed(seed, k, n_shards)``) and concatenated in shard
    order, so equal (seed, n, batch_size, n_shards) give equal samples on any number of ranks dividing
    n_shards. With ``process_group`` the shards are spread over the ranks and gathered on rank 0, which
    returns the result; the other ranks return None.
    """
    from tqdm.auto import tqdm
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    n_shards = n_shards or world_size_of(process_group)
    sizes, shards = split_sizes(n, n_shards), local_shards(n_shards, process_group)
    with tqdm(total=sum(sizes[k] for k in shards), desc="sampling", unit="sample",
              disable=None if progress and rank_of(process_group) == 0 else True) as bar:
        mine = {k: _sample_shard(run, sizes[k], shard_seed(seed, k, n_shards), batch_size, bar) for k in shards}
    gathered = gather_in_order(mine, process_group)
    if gathered is None:
        return None
    shard_parts = {k: part for rank_parts in gathered for k, part in rank_parts.items()}
    parts = [batch for k in range(n_shards) for batch in shard_parts[k]]
    xyz, log_w, u, acceptance = zip(*parts)
    return {"xyz": np.concatenate(xyz), "log_weights": np.concatenate(log_w), "reduced_energies": np.concatenate(u),
            "acceptance": {key: float(np.mean([a[key] for a in acceptance])) for key in acceptance[0]}}


#: ``sample --n auto``: samples of the first round, the granularity of later rounds, the most a round draws
#: per sample already drawn (a rare state's ESS estimate is noisy while small), the z of a 95% interval
FIRST_ROUND = 30000
ROUND_STEP = 10000
ROUND_GROWTH = 3
#: stop when the samples the least state's ESS per sample calls for exceed this many times --max-n
HOPELESS_FACTOR = 4
Z95 = 1.96


def state_ess_for(precision: float) -> float:
    """The Kish ESS a state needs for its free energy (against the rest) to have a 95% interval of about
    ``± precision`` kT: (1.96 / precision)², since the variance of the log of an importance-sampling
    estimate of a state's weight is about 1 / ESS."""
    return (Z95 / precision) ** 2


def round_seed(seed: int, index: int) -> int:
    """Seed of round ``index`` of :func:`sample_to_precision`: ``seed`` itself for the first (so its
    samples are those of ``sample(run, n, seed=seed)``), then independent streams derived from both."""
    if index == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(index), 0x5A4D]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def first_round(stages: int) -> int:
    """Samples of :func:`sample_to_precision`'s first round for a sampler with ``stages`` annealing stages:
    30,000, or as many as cost what 30,000 samples of 80 stages cost (7,500 for 320)."""
    return FIRST_ROUND if stages <= POOR_FLOW_STAGES else FIRST_ROUND * POOR_FLOW_STAGES // stages


def sample_to_precision(run: Run, precision: float, max_n: int, *, seed: int = 0, batch_size: int = 1024,
                        progress: bool = True, n_shards: int | None = None, process_group=None,
                        report=print, first: int = FIRST_ROUND, clock=time.monotonic) -> tuple[dict | None, str]:
    """Draw samples in rounds until every default state (phi sign, x sign), and the samples as a whole,
    have the Kish ESS :func:`state_ess_for` ``(precision)`` with k-hat <= 0.7, or ``max_n`` samples are
    drawn, or a state has no samples (more of the same sampler will not find it: the verdict says so),
    or the least state's ESS per sample says that even 4x ``max_n`` samples would not do.

    Why: an annealed sampler gives each state about its Boltzmann share of the samples, so the ESS of a
    rare state (phi > 0 of alanine dipeptide at 300 K: 0.3%) decides the precision of its free energy,
    and the number of samples it needs depends on the molecule and the model. The first round has
    ``first`` samples (``sample(run, first, seed=seed)``'s; 30,000, fewer for many stages:
    :func:`first_round`); each further round draws what the least state's ESS per sample says is missing
    (+10%, in steps of 10,000, at most 3x the samples so far).
    Returns the samples as :func:`sample` does (all rounds concatenated; None on ranks other than 0) and
    why it stopped. Each round's outcome goes to ``report``, with the wall time the next round should take
    at the pace so far (``clock``: seconds).
    """
    parts, result, index, n_next, reason, start = [], None, 0, min(first, max_n), "", clock()
    while n_next:
        part = sample(run, n_next, seed=round_seed(seed, index), batch_size=batch_size, progress=progress,
                      n_shards=n_shards, process_group=process_group)
        if part is not None:  # rank 0 (or a single process): it holds the samples and decides
            parts.append(part)
            result = _concatenated(parts)
            pace = (clock() - start) / len(result["log_weights"])
            n_next, reason = _next_round(run, result, precision, max_n, pace)
        n_next, reason = broadcast_from_main((n_next, reason), process_group)
        if n_next and rank_of(process_group) == 0:
            report(f"{reason}: drawing {n_next} more (~{_duration(n_next * pace)} at the pace so far)")
        index += 1
    return result, reason


def _concatenated(parts: list[dict]) -> dict:
    """One result from the rounds' results (acceptance: the sample-weighted mean)."""
    sizes = np.array([len(part["log_weights"]) for part in parts], dtype=float)
    return {**{key: np.concatenate([part[key] for part in parts]) for key in ("xyz", "log_weights", "reduced_energies")},
            "acceptance": {key: float(np.average([part["acceptance"][key] for part in parts], weights=sizes))
                           for key in parts[0]["acceptance"]}}


def _duration(seconds: float) -> str:
    """A wall time for people: 40 s, 12 min, 3.4 h."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def _next_round(run: Run, result: dict, precision: float, max_n: int, pace: float) -> tuple[int, str]:
    """How many more samples :func:`sample_to_precision` draws (0: stop) and why; ``pace``: seconds per
    sample so far."""
    log_w, target = result["log_weights"], state_ess_for(precision)
    n = len(log_w)
    verdict = diagnose(log_w, frame_states(run.mol, result["xyz"]))
    head = f"{n} samples"
    if verdict.n_nonfinite:
        return 0, f"{head}: {verdict.n_nonfinite} log weights are not finite"
    empty = [state.label for state in verdict.states if state.n == 0]
    if empty:
        return 0, f"{head}: {', '.join(empty)} has no samples (more samples of this sampler will not find it)"
    ess = {"all samples": (verdict.ess, verdict.k_hat), **{s.label: (s.ess, s.k_hat) for s in verdict.states}}
    label, (least, _) = min(ess.items(), key=lambda item: item[1][0])
    heavy = [name for name, (_, k_hat) in ess.items() if k_hat > MAX_KHAT]
    status = (f"{head}: least ESS {least:.1f} ({label}; {target:.0f} wanted for ±{precision:g} kT)"
              + (f", k-hat > {MAX_KHAT} in {', '.join(heavy)}" if heavy else ""))
    if least >= target and not heavy:
        return 0, f"{head}: every state has ESS >= {target:.0f} (±{precision:g} kT) and k-hat <= {MAX_KHAT}"
    if n >= max_n:
        return 0, f"{status}; stopped at --max-n {max_n}"
    wanted = 1.1 * n * target / max(least, 1.0) if least < target else 2 * n
    if wanted > HOPELESS_FACTOR * max_n:
        return 0, (f"{status}; at this rate that takes ~{int(wanted):,} samples (~{_duration(wanted * pace)}), over "
                   f"{HOPELESS_FACTOR}x --max-n: the sampler itself must get better (see the verdict)")
    more = min(ROUND_STEP * math.ceil((wanted - n) / ROUND_STEP), ROUND_GROWTH * n)
    return min(max(more, ROUND_STEP), max_n - n), status


#: ``sample --anneal auto``: pilot samples of the flow alone, and the thresholds that let it sample alone
PILOT_SAMPLES = 4000
PILOT_MIN_ESS_FRACTION = 0.1
PILOT_MAX_KHAT = 0.5
PILOT_MIN_STATE_SAMPLES = 100
#: annealing stages, twice as many for a flow whose pilot Kish ESS is below POOR_PILOT_ESS_FRACTION, and
#: eight times as many below VERY_POOR_PILOT_ESS_FRACTION
AUTO_ANNEAL_STAGES = 40
POOR_PILOT_ESS_FRACTION = 0.05
POOR_FLOW_STAGES = 2 * AUTO_ANNEAL_STAGES
VERY_POOR_PILOT_ESS_FRACTION = 0.005
VERY_POOR_FLOW_STAGES = 8 * AUTO_ANNEAL_STAGES


def choose_annealing(run: Run, *, seed: int = 0) -> tuple[int, str]:
    """Annealing stages for ``sample --anneal auto`` and the reason, from a pilot of the flow alone.

    A flow whose own weights are good is sampled alone: Kish ESS >= 10% and Pareto k-hat <= 0.5 on
    4,000 samples, and k-hat <= 0.5 within each default state (phi sign), each holding >= 100 of them (a
    fresh alanine dipeptide flow with pilot ESS 24% and k-hat 0.43 put ~80 in phi > 0, too few to judge;
    sampled alone, 240,000 samples left phi > 0 with k-hat 0.88; another, ESS 21%, had k-hat 0.60 in
    phi > 0 on 20,000 samples, and alone gave 6.02 [5.87, 6.18] kT against the exchange grids' 5.73: with
    k-hat above 0.5 the weights' variance is infinite and the estimate lags the truth). Each
    sample then costs one flow pass and one energy, ~80x less than annealing. Otherwise 40 annealing
    stages: on alanine dipeptide in implicit solvent they raised a flow's ESS from 16% to 60%, and
    brought the rare state's k-hat from 0.8 (the flow's weights there too heavy-tailed to trust) to 0.5.
    A flow with a pilot ESS below 5% gets 80: on tri-alanine (pilot 1.4%) 40 stages gave ESS 14%, 80
    gave 34% and 1.3-1.6x the rare states' ESS per sample, at twice the cost per sample. Below 0.5% it
    gets 320 (:func:`first_round` draws fewer samples for them): on a capped Ala-Ser-Phe peptide (pilot
    0.04-0.1%) 320 stages x 1,000 samples beat 80 x 4,000 at equal cost (benchmarks/HISTORY.md).
    Models with stochastic blocks cannot be annealed (0).
    """
    from .weights import kish_ess, pareto_khat
    if run.config["model"].get("stochastic") is not None:
        return 0, "the model has stochastic blocks (no annealing)"
    pilot = sample(run, PILOT_SAMPLES, seed=seed + 7919, progress=False)
    log_w = pilot["log_weights"]
    ess, khat = kish_ess(log_w) / PILOT_SAMPLES, pareto_khat(log_w)
    summary = f"pilot of {PILOT_SAMPLES} flow samples: Kish ESS {100 * ess:.1f}%, k-hat {khat:.2f}"
    states = frame_states(run.mol, pilot["xyz"])
    state_khats = {label: pareto_khat(log_w[mask]) for label, mask in states.items()
                   if mask.sum() >= PILOT_MIN_STATE_SAMPLES}
    heavy = [f"{label} {value:.2f}" for label, value in state_khats.items() if value > PILOT_MAX_KHAT]
    if heavy:
        summary += f", k-hat within {', '.join(heavy)} (> {PILOT_MAX_KHAT})"
    unjudged = [f"{label} ({int(mask.sum())})" for label, mask in states.items() if label not in state_khats]
    if unjudged:
        summary += f", too few samples to judge the tail in {', '.join(unjudged)} (< {PILOT_MIN_STATE_SAMPLES})"
    if ess >= PILOT_MIN_ESS_FRACTION and khat <= PILOT_MAX_KHAT and not heavy and not unjudged:
        return 0, f"{summary}: sampling the flow alone"
    stages = (VERY_POOR_FLOW_STAGES if ess < VERY_POOR_PILOT_ESS_FRACTION else
              POOR_FLOW_STAGES if ess < POOR_PILOT_ESS_FRACTION else AUTO_ANNEAL_STAGES)
    return stages, f"{summary}: annealing with {stages} stages (--anneal 0 to skip)"


#: annealing defaults: Metropolis steps per stage and their proposal width (prior units). 4 steps, not 2:
#: on alanine dipeptide implicit with ``--n auto``, seeds 0 and 1 took 680 and 690 s (2 steps: 601 and
#: 1,362 s, the second at the 240,000 cap), Kish ESS 72% and 65% (60% and 41%), phi > 0's k-hat 0.39
#: and 0.02 (0.27 and 0.62)
ANNEAL_STEPS = 4
ANNEAL_STEP_SIZE = 0.2


def with_annealing(run: Run, stages: int | str, *, kernel: str = "mc", n_steps: int = ANNEAL_STEPS,
                   step_size: float = ANNEAL_STEP_SIZE, seed: int = 0) -> tuple[Run, int, str | None]:
    """``run`` with its flow refined by ``stages`` annealing stages (:func:`~openmm_snf.flows.anneal.annealed`;
    weights stay exact), the stages used, and with ``"auto"`` the reason of :func:`choose_annealing`."""
    reason = None
    if stages == "auto":
        stages, reason = choose_annealing(run, seed=seed)
    if stages:
        run = replace(run, snf=annealed(run.snf, stages, n_steps=n_steps, step_size=step_size, kernel=kernel))
    return run, stages, reason


@dataclass(frozen=True)
class Draw:
    """Outcome of :func:`draw`: the samples as :func:`sample` returns them (None on ranks other than 0), the
    run they came from (its flow annealed when ``stages`` > 0) and, for ``n="auto"``, why the rounds stopped."""
    samples: dict | None
    run: Run
    stages: int
    stopped: str | None = None


#: ``sample --n auto`` defaults: the wanted 95% half-width of each state's free energy (kT), the most samples
DEFAULT_PRECISION = 0.15
DEFAULT_MAX_N = 240000


def draw(run: Run, n: int | str, *, anneal: int | str = "auto", kernel: str = "mc", n_steps: int = ANNEAL_STEPS,
         step_size: float = ANNEAL_STEP_SIZE, precision: float = DEFAULT_PRECISION, max_n: int = DEFAULT_MAX_N,
         seed: int = 0, batch_size: int = 1024, progress: bool = True, n_shards: int | None = None,
         process_group=None, report=lambda topic, line: None) -> Draw:
    """What ``openmm-snf sample`` draws: ``run`` annealed as :func:`with_annealing` says (``anneal``: stages,
    ``"auto"`` or 0), then ``n`` samples (:func:`sample`) or, with ``n="auto"``, rounds to ``precision``
    (:func:`sample_to_precision`, its first round :func:`first_round` of the stages).

    ``report(topic, line)`` gets, on rank 0, the reason ``"auto"`` annealing chose its stages (topic
    ``"anneal"``) and each further round of ``n="auto"`` (topic ``"n"``).
    """
    run, stages, reason = with_annealing(run, anneal, kernel=kernel, n_steps=n_steps, step_size=step_size, seed=seed)
    if reason is not None and rank_of(process_group) == 0:
        report("anneal", reason)
    options = {"seed": seed, "batch_size": batch_size, "progress": progress, "n_shards": n_shards,
               "process_group": process_group}
    if n == "auto":
        samples, stopped = sample_to_precision(run, precision, max_n, report=lambda line: report("n", line),
                                               first=first_round(stages), **options)
        return Draw(samples, run, stages, stopped)
    return Draw(sample(run, n, **options), run, stages)


def _sample_shard(run: Run, n: int, seed: int, batch_size: int, bar) -> list[tuple]:
    """Batches (xyz, log_weights, reduced energies, acceptance dict) of ``n`` samples from one generator."""
    generator = torch.Generator(device=run.snf.prior.device).manual_seed(seed)
    batches, drawn = [], 0
    while drawn < n:
        batch = run.snf.sample(min(batch_size, n - drawn), generator=generator)
        batches.append((batch.x.reshape(len(batch.x), run.mol.n_atoms, 3).cpu().double().numpy(),
                        batch.log_weights.cpu().numpy(), batch.target_energy.cpu().numpy(), batch.acceptance))
        drawn += len(batch.x)
        bar.update(len(batch.x))
    return batches

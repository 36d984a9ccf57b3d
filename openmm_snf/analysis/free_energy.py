"""Free-energy differences between states from importance-weighted samples, with bootstrap intervals.

With self-normalized weights w, the probability of a state is P_A = sum_{i in A} w_i / sum_i w_i and

    delta_f = -ln(sum_A w / sum_B w) = F_A - F_B      (in kT; positive when A is less probable than B).

Sums of weights are taken in log space (log-sum-exp), so that weights spanning thousands of kT give a finite
delta_f. The bootstrap resamples frames (or blocks of consecutive frames for correlated MD data) with
replacement and recomputes delta_f; the interval is the percentile interval of the replicates. Every result
carries the :class:`~.diagnostics.Verdict` on its weights and two states. pymbar's EXP estimator,
applied to each state's log partition function (work = -log w inside the state, +inf outside), gives an
independent evaluation of the same point estimate and an analytic error estimate.
"""
from __future__ import annotations

import contextlib
import io as _io
import math
from dataclasses import dataclass, fields

import numpy as np

from ..weights import kish_ess
from .cvs import compute_cvs
from .diagnostics import Verdict, diagnose
from .errors import AnalysisError, EmptyStateError
from .states import State, parse_state

__all__ = ["FreeEnergyResult", "free_energy_difference", "state_free_energy", "bootstrap_indices",
           "automatic_block_length", "pymbar_exp_delta_f"]


@dataclass(frozen=True)
class FreeEnergyResult:
    """delta_f = F_A - F_B with its bootstrap interval, per-state sample counts and Kish ESS.

    Energies are in kT; the ``*_kj_per_mol`` properties need ``kT`` (kJ/mol) to be set.
    ``n_bootstrap_degenerate`` counts replicates in which a state received no weight (infinite delta_f);
    when it is not zero the interval may be unbounded: collect more samples. ``verdict`` says whether the
    estimate can be trusted (overall and per-state ESS, Pareto k-hat) and, if not, why and what to do.
    """

    label_a: str
    label_b: str
    delta_f: float
    ci_low: float
    ci_high: float
    std: float
    confidence: float
    n_bootstrap: int
    n_bootstrap_degenerate: int
    n_a: int
    n_b: int
    n_total: int
    ess_a: float
    ess_b: float
    ess_total: float
    population_a: float
    population_b: float
    exp_delta_f: float
    exp_std: float
    kT: float | None = None
    verdict: Verdict | None = None
    block_length: int = 1

    def _kj(self, value: float) -> float:
        if self.kT is None:
            raise AnalysisError("kT (kJ/mol) is unknown: pass kT=... to report kJ/mol")
        return value * self.kT

    @property
    def delta_f_kj_per_mol(self) -> float:
        return self._kj(self.delta_f)

    @property
    def ci_kj_per_mol(self) -> tuple[float, float]:
        return self._kj(self.ci_low), self._kj(self.ci_high)

    def to_dict(self) -> dict:
        """Plain dictionary for strict JSON: kJ/mol fields when kT is known, the verdict, None for inf/nan."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "verdict"}
        if self.kT is not None:
            out["delta_f_kj_per_mol"] = self.delta_f_kj_per_mol
            out["ci_low_kj_per_mol"], out["ci_high_kj_per_mol"] = self.ci_kj_per_mol
            out["std_kj_per_mol"] = self._kj(self.std)
        bad = [f"{key}={value}" for key, value in out.items() if isinstance(value, float) and not math.isfinite(value)]
        out = {key: None if isinstance(value, float) and not math.isfinite(value) else value
               for key, value in out.items()}
        if bad:  # a null is a failed estimate, not a missing one
            out["error"] = "not finite, written as null: " + ", ".join(bad)
        out["verdict"] = self.verdict.to_dict() if self.verdict is not None else None
        return out

    def summary(self) -> str:
        """One human-readable line, e.g. ``dF(A-B) = 1.23 kT [1.1, 1.4] (95%) = 3.07 kJ/mol ...``."""
        text = (f"dF({self.label_a} - {self.label_b}) = {self.delta_f:.3f} kT "
                f"[{_bound(self.ci_low)}, {_bound(self.ci_high)}] ({self.confidence:.0%} bootstrap"
                + (f" in blocks of {self.block_length} frames)" if self.block_length > 1 else ")"))
        if self.kT is not None:
            low, high = self.ci_kj_per_mol
            text += f" = {self.delta_f_kj_per_mol:.3f} kJ/mol [{_bound(low)}, {_bound(high)}]"
        return text + (f"; ESS {self.label_a}: {self.ess_a:.1f} of {self.n_a}, "
                       f"{self.label_b}: {self.ess_b:.1f} of {self.n_b}")


def _bound(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "unbounded"


def _row_logsumexp(values: np.ndarray) -> np.ndarray:
    """log(sum(exp(values), axis=1)) of a 2-D array; -inf for a row of -inf (no weight)."""
    top = values.max(axis=1)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(values - shift[:, None]).sum(axis=1)) + shift


def bootstrap_indices(n: int, n_replicates: int, rng: np.random.Generator, block_length: int = 1) -> np.ndarray:
    """(n_replicates, n) frame indices drawn with replacement, in moving blocks of ``block_length`` frames."""
    if block_length < 1 or block_length > n:
        raise AnalysisError(f"block_length must be between 1 and the number of frames {n}, got {block_length}")
    n_blocks = -(-n // block_length)
    starts = rng.integers(0, n - block_length + 1, size=(n_replicates, n_blocks))
    return (starts[:, :, None] + np.arange(block_length)).reshape(n_replicates, -1)[:, :n]


def _bootstrap_delta_f(log_w_a, log_w_b, n_bootstrap, rng, block_length):
    """Replicates of delta_f from log weights that are -inf outside each state; a replicate missing a state
    is infinite (one missing both counts as +inf)."""
    n = len(log_w_a)
    chunk = max(1, 2_000_000 // n)
    replicates = []
    with np.errstate(invalid="ignore"):
        for start in range(0, n_bootstrap, chunk):
            index = bootstrap_indices(n, min(chunk, n_bootstrap - start), rng, block_length)
            replicates.append(_row_logsumexp(log_w_b[index]) - _row_logsumexp(log_w_a[index]))
    replicates = np.concatenate(replicates)
    return np.where(np.isnan(replicates), np.inf, replicates)


def automatic_block_length(in_a, in_b) -> int:
    """Bootstrap block length for frames in time order: the larger statistical inefficiency g of the two
    state indicators (pymbar.timeseries), rounded; 1 for uncorrelated samples (g ~ 1) or a constant indicator."""
    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
        from pymbar import timeseries
    inefficiency = 1.0
    for mask in (in_a, in_b):
        indicator = np.asarray(mask, dtype=np.float64)
        if 0 < indicator.sum() < indicator.size:
            inefficiency = max(inefficiency, float(timeseries.statistical_inefficiency(indicator)))
    return max(1, min(int(round(inefficiency)), len(np.asarray(in_a)) // 2 or 1))


def pymbar_exp_delta_f(log_weights, in_a, in_b) -> tuple[float, float]:
    """F_A - F_B and its analytic standard error from pymbar's EXP estimator (covariance ignored)."""
    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
        from pymbar.other_estimators import exp  # prints an advertisement for JAX on import
    log_w = np.asarray(log_weights, dtype=np.float64)
    f_a = exp(np.where(in_a, -log_w, np.inf))
    f_b = exp(np.where(in_b, -log_w, np.inf))
    return float(f_a["Delta_f"] - f_b["Delta_f"]), float(math.hypot(f_a["dDelta_f"], f_b["dDelta_f"]))


def free_energy_difference(log_weights, in_a, in_b, *, labels=("A", "B"), kT: float | None = None,
                           n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                           block_length: int | str = 1, advice: dict | None = None) -> FreeEnergyResult:
    """delta_f = F_A - F_B = -ln(sum_A w / sum_B w) with a bootstrap percentile interval.

    Args:
        log_weights: (n,) float log importance weights (finite; any additive constant).
        in_a, in_b: (n,) boolean masks of the frames in each state.
        labels: state names for messages and reports.
        kT: k_B T in kJ/mol, to report kJ/mol as well.
        n_bootstrap: bootstrap replicates (>= 10).
        confidence: two-sided level of the interval, e.g. 0.95.
        seed: seed of the bootstrap's ``numpy.random.Generator``.
        block_length: frames per resampled block; > 1 for correlated (MD) frames; ``"auto"``: from the
            statistical inefficiency of the state indicators in frame order (:func:`automatic_block_length`).
        advice: the verdict's ``remedy``, ``more`` and ``missing`` (:func:`~.diagnostics.data_advice`; None: a flow's).
    Raises:
        EmptyStateError: a state holds no samples (its ``verdict`` says what to do).
    """
    log_w = np.asarray(log_weights, dtype=np.float64)
    in_a, in_b = np.asarray(in_a, dtype=bool), np.asarray(in_b, dtype=bool)
    if log_w.ndim != 1 or in_a.shape != log_w.shape or in_b.shape != log_w.shape:
        raise AnalysisError(f"log_weights {log_w.shape} and the state masks {in_a.shape}, {in_b.shape} must be "
                         "1-D of equal length")
    if not np.all(np.isfinite(log_w)):
        raise AnalysisError(f"log_weights are not finite at frames {np.flatnonzero(~np.isfinite(log_w))[:5]}")
    if labels[0] == labels[1]:
        raise AnalysisError(f"both states are labelled {labels[0]!r}; give them different labels, e.g. "
                            "\"A: ...\" \"B: ...\"")
    if n_bootstrap < 10 or not 0 < confidence < 1:
        raise AnalysisError(f"need n_bootstrap >= 10 and 0 < confidence < 1, got {n_bootstrap}, {confidence}")
    verdict = diagnose(log_w, dict(zip(labels, (in_a, in_b))), **(advice or {}))
    for label, mask in zip(labels, (in_a, in_b)):
        if not mask.any():
            raise EmptyStateError(f"state {label!r} has no samples among {len(log_w)} frames; widen its "
                                  "definition or draw more samples", verdict=verdict)
    if block_length == "auto":
        block_length = automatic_block_length(in_a, in_b)
    log_w_a, log_w_b = np.where(in_a, log_w, -np.inf), np.where(in_b, log_w, -np.inf)
    log_sum_a, log_sum_b, log_sum = (np.logaddexp.reduce(v) for v in (log_w[in_a], log_w[in_b], log_w))
    delta_f = float(log_sum_b - log_sum_a)
    replicates = _bootstrap_delta_f(log_w_a, log_w_b, n_bootstrap, np.random.default_rng(seed), block_length)
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail], method="inverted_cdf")
    degenerate = int(np.sum(~np.isfinite(replicates)))
    exp_delta_f, exp_std = pymbar_exp_delta_f(log_w, in_a, in_b)
    return FreeEnergyResult(
        label_a=labels[0], label_b=labels[1], delta_f=delta_f, ci_low=float(low), ci_high=float(high),
        std=float(np.std(replicates)) if degenerate == 0 else math.inf, confidence=confidence,
        n_bootstrap=n_bootstrap, n_bootstrap_degenerate=degenerate, n_a=int(in_a.sum()), n_b=int(in_b.sum()),
        n_total=len(log_w), ess_a=kish_ess(log_w[in_a]), ess_b=kish_ess(log_w[in_b]), ess_total=kish_ess(log_w),
        population_a=float(np.exp(log_sum_a - log_sum)), population_b=float(np.exp(log_sum_b - log_sum)),
        exp_delta_f=exp_delta_f, exp_std=exp_std, kT=kT, verdict=verdict, block_length=int(block_length))


def _describe_ranges(values: dict) -> str:
    return ", ".join(f"{name} in [{np.min(v):.3g}, {np.max(v):.3g}]" for name, v in values.items())


def state_free_energy(traj, log_weights, state_a, state_b, *, cvs: dict | None = None, reference=None,
                      **options) -> FreeEnergyResult:
    """delta_f between two states given as strings (``"A: phi < 0"``) or :class:`State` objects.

    Args:
        traj: ``mdtraj.Trajectory`` aligned with ``log_weights`` (n_frames,).
        state_a, state_b: state definitions; their CVs are resolved by :func:`~.cvs.compute_cv`.
        cvs: named CV definitions (e.g. ``MolecularSystem.cvs`` plus user ``--cv`` definitions).
        reference: RMSD reference (``mdtraj.Trajectory``), if a state uses an RMSD.
        options: passed to :func:`free_energy_difference` (kT, n_bootstrap, confidence, seed, block_length).
    Raises:
        StateError, CVError, EmptyStateError (with the CV ranges seen in the data).
    """
    states = [s if isinstance(s, State) else parse_state(s) for s in (state_a, state_b)]
    names = sorted(set(states[0].cv_names) | set(states[1].cv_names))
    values = compute_cvs(traj, names, cvs=cvs, reference=reference)
    masks = [state.mask(values) for state in states]
    for state, mask in zip(states, masks):
        if not mask.any():
            verdict = diagnose(log_weights, {s.label: m for s, m in zip(states, masks)},
                               **(options.get("advice") or {}))
            raise EmptyStateError(f"state {str(state)!r} has no samples among {traj.n_frames} frames (the data "
                                  f"have {_describe_ranges(values)}); no free energy without samples in both "
                                  "states", verdict=verdict)
    return free_energy_difference(log_weights, masks[0], masks[1], labels=(states[0].label, states[1].label),
                                  **options)

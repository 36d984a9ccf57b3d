"""A reliability verdict on importance-weighted samples: overall and per-state Kish ESS, and Pareto k-hat.

Kish ESS alone can look fine while a state is missing entirely (a flow trained on one well samples that
well with near-equal weights), so the verdict also counts the samples and the effective sample size in
each state, and reads the tail of the weights (:func:`~openmm_snf.weights.pareto_khat`). It is unreliable
when any of these holds:

- a log weight is not finite;
- the Kish ESS is below ``min_ess_fraction`` of the samples, or below ``min_state_ess``;
- Pareto k-hat > ``max_khat`` (0.7: Vehtari et al.'s limit beyond which the estimate does not converge
  at a usable rate);
- a state holds no samples, its ESS is below ``min_state_ess``, or the k-hat of its own weights (those
  of the importance-sampling estimate of its partition function, which a free energy divides) > ``max_khat``.

Each reason comes with what to do about it; reasons sharing the same advice print as one line. Weights
too heavy-tailed (overall or within a state) call for a better sampler (``remedy``: more annealing stages
or training), not for more samples: beyond k-hat 0.7 the error shrinks too slowly with their number.

A state whose own k-hat lies between 0.5 and 0.7 passes, with a caution: plain importance sampling has
infinite variance beyond k = 0.5, so the estimate still converges but its bootstrap interval can be too
narrow; a run with another seed shows the spread.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..weights import kish_ess, pareto_khat
from .cvs import compute_cvs, known_cv_names, torsion_atoms
from .states import parse_state

__all__ = ["StateDiagnostic", "Verdict", "diagnose", "default_states", "MIN_ESS_FRACTION", "MIN_STATE_ESS",
           "MAX_KHAT", "MORE_TRAINING", "data_advice"]

MIN_ESS_FRACTION = 0.01
MIN_STATE_ESS = 30.0
MAX_KHAT = 0.7
GOOD_KHAT = 0.5

MORE_TRAINING = ("train longer ('openmm-snf train ... --resume --iterations N'), or for a flow-only model "
                 "sample with --anneal K")


VISIT_DATA = ("train on data that visit it: parallel tempering ('openmm-snf md SYSTEM --out d.dcd', the default, "
              "with a higher --max-temperature if needed, then 'train --data d.dcd'), 'openmm-snf umbrella' "
              "windows along its CV, or MD started in it")


#: what to do about uneven weights (``remedy``), about too few samples of a state whose weights are sound
#: (``more``) and about a state without samples (``missing``), for weighted frames made without a flow, by the
#: sidecar entry that marks where they came from
_DATA_ADVICE = {
    "N_k": {"remedy": "run the umbrella sampling longer (--frames) or with more --windows or a smaller --k, so that "
                      "every window samples its range and neighbouring windows overlap",
            "more": "run the umbrella sampling longer (--frames): the state's ESS grows with the frames",
            "missing": "no umbrella frame lies in it: bias the CV that defines the state ('openmm-snf umbrella "
                       "--cv ...'), or check the state's definition (ignore this if the state has no Boltzmann "
                       "weight)"},
    "temperatures": {"remedy": "run 'openmm-snf md' longer (--frames) or with more --replicas, so that the ladder "
                               "brings the state down to T often, or sample it by 'openmm-snf umbrella' along its CV",
                     "more": "run 'openmm-snf md' longer (--frames) or with more --replicas: the state's ESS grows "
                             "with the frames",
                     "missing": "no tempering frame lies in it: run 'openmm-snf md' with a higher --max-temperature "
                                "or longer (--frames) so that the ladder reaches it, or sample it by 'openmm-snf "
                                "umbrella' along its CV (ignore this if the state has no Boltzmann weight)"},
}


def data_advice(extra: dict) -> dict:
    """:func:`diagnose`'s ``remedy``, ``more`` and ``missing`` for weighted frames whose sidecar holds
    ``extra``: those of umbrella sampling (``N_k``) or parallel tempering (``temperatures``); {} for samples
    of a flow."""
    return next((dict(advice) for key, advice in _DATA_ADVICE.items() if key in extra), {})


def _never_proposed(label: str) -> str:
    return (f"the sampler never proposed {label}: its training data did not cover that state; {VISIT_DATA}; "
            "then sample again (ignore this if the state has no Boltzmann weight)")


@dataclass(frozen=True)
class StateDiagnostic:
    """One state's share of the samples: ``n`` samples, their Kish ``ess``, weighted ``population`` and the
    Pareto ``k_hat`` of their weights."""

    label: str
    n: int
    ess: float
    population: float
    k_hat: float

    def summary(self) -> str:
        k_hat = f", k-hat {self.k_hat:.2f}" if math.isfinite(self.k_hat) else ""
        return f"{self.label}: ESS {self.ess:.1f} of {self.n} ({self.population:.1%}{k_hat})"


def _finite_or_none(value):
    return value if isinstance(value, (int, str, bool)) or math.isfinite(value) else None


@dataclass(frozen=True)
class Verdict:
    """Whether importance-weighted estimates from these samples can be trusted, and why not.

    ``reasons[i]`` is a one-line finding and ``advice[i]`` what to do about it; ``reliable`` is True when
    there is no reason. ``k_hat`` is ``-inf`` for equal weights and ``nan`` when too few samples to fit.
    """

    n: int
    ess: float
    k_hat: float
    n_nonfinite: int
    states: tuple[StateDiagnostic, ...] = ()
    reasons: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    cautions: tuple[str, ...] = ()

    @property
    def reliable(self) -> bool:
        return not self.reasons

    @property
    def ess_fraction(self) -> float:
        return self.ess / self.n if self.n else 0.0

    def khat_text(self) -> str:
        """k-hat with its reading: ``0.42 (good)``, ``0.63 (usable)``, ``0.91 (unreliable)``."""
        if math.isnan(self.k_hat):
            return "n/a (too few samples)"
        if self.k_hat == -math.inf:
            return "none (equal weights)"
        grade = "good" if self.k_hat < GOOD_KHAT else "usable" if self.k_hat <= MAX_KHAT else "unreliable"
        return f"{self.k_hat:.2f} ({grade})"

    def summary(self) -> str:
        """One line: overall Kish ESS, k-hat and each state's ESS."""
        text = (f"Kish ESS {self.ess:.1f} ({self.ess_fraction:.2%} of {self.n}); Pareto k-hat {self.khat_text()}")
        return text + "".join(f"; {state.summary()}" for state in self.states)

    def lines(self) -> list[str]:
        """``UNRELIABLE: <reason>; <what to do>`` per distinct advice (reasons sharing one are joined by
        "and"), or one ``reliable: ...`` line followed by any ``caution: ...`` lines."""
        if self.reliable:
            return [f"reliable: Kish ESS {self.ess_fraction:.1%}, k-hat {self.khat_text()}"
                    + (f"; every state has ESS >= {MIN_STATE_ESS:.0f} and k-hat <= {MAX_KHAT}" if self.states else "")
                    ] + [f"caution: {caution}" for caution in self.cautions]
        grouped: dict[str, list[str]] = {}
        for reason, advice in zip(self.reasons, self.advice):
            grouped.setdefault(advice, []).append(reason)
        return [f"UNRELIABLE: {' and '.join(reasons)}; {advice}" for advice, reasons in grouped.items()]

    def to_dict(self) -> dict:
        """Plain dictionary for strict JSON (non-finite numbers become None)."""
        return {"reliable": self.reliable, "n": self.n, "ess": _finite_or_none(self.ess),
                "ess_fraction": _finite_or_none(self.ess_fraction), "k_hat": _finite_or_none(self.k_hat),
                "n_nonfinite": self.n_nonfinite,
                "states": [{"label": s.label, "n": s.n, "ess": _finite_or_none(s.ess),
                            "population": _finite_or_none(s.population), "k_hat": _finite_or_none(s.k_hat)}
                           for s in self.states],
                "reasons": list(self.reasons), "advice": list(self.advice), "cautions": list(self.cautions)}


def _more_samples(n: int, ess: float, wanted: float) -> str:
    """Advice for a state whose weights are sound (k-hat fine) but too few (within 20x of enough): how
    many samples would do."""
    needed = 1.5 * n * wanted / max(ess, 1.0)
    step = 10 ** max(int(math.log10(needed)) - 1, 0)
    suggestion = int(math.ceil(needed / step) * step)
    return (f"draw about {suggestion} samples (--n {suggestion}): the state's weights are sound and its ESS "
            "grows in proportion to the number of samples")


def _state_diagnostic(label: str, log_w: np.ndarray, mask: np.ndarray, log_total: float) -> StateDiagnostic:
    inside = log_w[mask]
    if inside.size == 0:
        return StateDiagnostic(label, 0, 0.0, 0.0, math.nan)
    log_sum = np.logaddexp.reduce(inside)
    return StateDiagnostic(label, int(inside.size), kish_ess(inside), float(np.exp(log_sum - log_total)),
                           pareto_khat(inside))


def diagnose(log_weights, states: dict | None = None, *, min_ess_fraction: float = MIN_ESS_FRACTION,
             min_state_ess: float = MIN_STATE_ESS, max_khat: float = MAX_KHAT,
             remedy: str = MORE_TRAINING, more: str | None = None, missing: str | None = None) -> Verdict:
    """The :class:`Verdict` on samples with ``log_weights`` (n,), optionally split into ``states``.

    Args:
        log_weights: (n,) float log importance weights (any additive constant).
        states: ``{label: (n,) boolean mask}``; each state is checked for samples and effective sample size.
        min_ess_fraction: smallest acceptable Kish ESS / n.
        min_state_ess: smallest acceptable Kish ESS overall and in each state.
        max_khat: largest acceptable Pareto k-hat.
        remedy: what to do when the weights are too uneven (the default names both training longer and
            annealing; a caller that knows the model can be specific).
        more: what to do when there are too few samples whose weights are sound (None: draw more with the
            sampler's --n, how many when that is within reach); see :func:`data_advice`.
        missing: what to do about a state without samples (None: a flow's advice, to train on data that
            visit it).
    """
    log_w = np.asarray(log_weights, dtype=np.float64).ravel()
    finite = np.isfinite(log_w)
    n, n_nonfinite = len(log_w), int(np.sum(~finite))
    log_w = np.where(finite, log_w, -np.inf)  # a non-finite weight counts as no weight in the diagnostics
    ess = kish_ess(log_w[finite]) if finite.any() else 0.0
    k_hat = pareto_khat(log_w)
    log_total = np.logaddexp.reduce(log_w[finite]) if finite.any() else -np.inf
    diagnostics = tuple(_state_diagnostic(label, log_w, finite & np.asarray(mask, dtype=bool), log_total)
                        for label, mask in (states or {}).items())
    found: list[tuple[str, str]] = []  # (reason, advice)
    if n_nonfinite:
        found.append((f"{n_nonfinite} of {n} log weights are not finite (first at frame "
                      f"{int(np.flatnonzero(~finite)[0])})",
                      "the sampler produced invalid energies or path weights: check the system and the model "
                      "(e.g. atoms overlapping), then sample again"))
    uneven = []
    if n and ess < min_ess_fraction * n:
        uneven.append(f"Kish ESS {ess:.1f} is {ess / n:.2%} of {n} samples (< {min_ess_fraction:.0%}): a few "
                      "samples carry the weight")
    if k_hat > max_khat:
        uneven.append(f"Pareto k-hat {k_hat:.2f} > {max_khat}: the weights' tail is too heavy for estimates "
                      "to converge")
    found += [(reason, remedy) for reason in uneven]
    if not uneven and ess < min_state_ess:
        found.append((f"Kish ESS {ess:.1f} of {n} samples is below {min_state_ess:.0f}",
                      more or "draw more samples (--n)"))
    for state in diagnostics:
        if state.n == 0:
            found.append((f"state {state.label} has no samples", missing or _never_proposed(state.label)))
            continue
        problems = ([f"ESS {state.ess:.1f} from {state.n} samples (< {min_state_ess:.0f})"]
                    if state.ess < min_state_ess else [])
        problems += [f"Pareto k-hat {state.k_hat:.2f} > {max_khat}"] if state.k_hat > max_khat else []
        if not problems:
            continue
        if state.k_hat > max_khat:  # more samples of the same sampler converge too slowly: improve the sampler
            advice = remedy
        elif more is not None:
            advice = more
        elif state.ess * 20 >= min_state_ess:
            advice = _more_samples(n, state.ess, min_state_ess)
        else:
            advice = "draw more samples (--n); if that does not help, the sampler rarely proposes the state: " + VISIT_DATA
        found.append((f"state {state.label} has {' and '.join(problems)}", advice))
    cautions = tuple(f"state {state.label} has k-hat {state.k_hat:.2f} (> {GOOD_KHAT}: importance weights with "
                     "infinite variance): estimates converge, but intervals involving it can be too narrow; "
                     "compare a run with another --seed" for state in diagnostics
                     if state.n and GOOD_KHAT < state.k_hat <= max_khat)
    return Verdict(n=n, ess=ess, k_hat=k_hat, n_nonfinite=n_nonfinite, states=diagnostics,
                   reasons=tuple(reason for reason, _ in found), advice=tuple(advice for _, advice in found),
                   cautions=cautions)


_PHI = re.compile(r"^phi(\[\w+\])?$")


def _is_proline_phi(traj, name: str) -> bool:
    """Whether the topology's torsion ``phi`` / ``phi[ALA2]`` is a proline's (its ring fixes phi near -65 deg)."""
    atoms = torsion_atoms(traj.topology, name)
    return atoms is not None and traj.topology.atom(atoms[2]).residue.name == "PRO"


def default_states(traj, cvs: dict | None = None) -> dict[str, np.ndarray]:
    """States every sampler of this system should visit, as ``{label: (n_frames,) mask}``.

    A system with position CVs (the double well's ``x``): ``x<0`` and ``x>0`` for each. Otherwise each
    backbone phi from the topology (or the system's ``phi`` CV), proline's excepted: ``phi<0`` and
    ``phi>0``. Otherwise none (the verdict is then on the overall weights only).
    """
    cvs = cvs or {}
    names = [name for name, definition in cvs.items() if definition.get("kind") == "position"]
    if not names:
        names = [name for name in known_cv_names(traj, cvs) if _PHI.match(name)
                 and not (name not in cvs and _is_proline_phi(traj, name))]
    values = compute_cvs(traj, names, cvs=cvs)
    out = {}
    for name in names:
        for op in ("<", ">"):
            state = parse_state(f"{name} {op} 0")
            out[f"{name}{op}0"] = state.mask(values)
    return out

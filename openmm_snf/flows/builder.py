"""Build the standard SNF architectures from keyword arguments or a config dict.

Layout for ``n_blocks`` = K (the paper's ``boltzmann_generator_RNVP_MC``):

    prior -> [coupling(A), coupling(B), stochastic(λ_1)] × K -> [MarginalizeAuxiliary] -> [transform]

* Couplings: ``flow="realnvp"`` (affine) or ``"spline"`` (rational-quadratic) on ordinary dims;
  both use circular splines + rotations on periodic dims. Masks A/B of pair k (``masks``):
  ``"alternating"`` splits the periodic dims and the ordinary dims each into two halves, by even/odd
  rank for even k and first/second half for odd k, so that torsions condition on torsions;
  ``"halves"`` (the paper's) takes the two halves of the latent vector, which in internal coordinates
  puts all torsions on one side. With ``augment`` > 0: the auxiliary momenta v and the configuration q.
* Stochastic blocks (``"mc"``, ``"langevin"`` (overdamped), ``"underdamped"`` or None) sample
  u_λ = (1 − λ) u_prior + λ [u_target(T(y)) − log|det J_T(y)| + ½|v|²] in the latent space, where T
  is the fixed ``transform`` (e.g. internal -> Cartesian coordinates). Default λ schedule:
  0, 1/(K−1), …, 1, as in the paper.
* Prior: N(0, I) on ordinary dims and auxiliary momenta, U[−π, π) on periodic dims.

The builder's keyword arguments are stored on ``snf.config`` so checkpoints can rebuild the model.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from .augment import MarginalizeAuxiliary
from .couplings import ACTIVATIONS, AffineCoupling, SplineCoupling
from .energies import InterpolatedEnergy, PulledBackEnergy
from .priors import Prior, as_periodic_mask
from .snf import SNF
from .stochastic import MALABlock, MetropolisBlock, OverdampedLangevinBlock, UnderdampedLangevinBlock

__all__ = ["build_snf", "build_snf_from_config", "check_snf_options", "saved_snf_options", "snf_defaults",
           "PAPER_ALANINE_DIPEPTIDE", "PAPER_DOUBLE_WELL"]

FLOWS = ("realnvp", "spline")
STOCHASTIC = ("mc", "mala", "langevin", "underdamped", None)
MASKS = ("alternating", "halves")

#: The paper's alanine dipeptide model (augment = 3 × 22 atoms; use with the IC transform).
PAPER_ALANINE_DIPEPTIDE = dict(n_blocks=5, flow="realnvp", hidden=(128, 128, 128), activation="relu",
                               stochastic="mc", n_steps=20, step_size=0.1,
                               lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), augment=66)
#: The paper's double-well SNF (RNVP + MC, 2-D).
PAPER_DOUBLE_WELL = dict(n_blocks=3, flow="realnvp", hidden=(64, 64, 64), activation="relu",
                         stochastic="mc", n_steps=20, step_size=0.1)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_OPTION_CHECKS = {
    "n_blocks": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "flow": (lambda v: v in FLOWS, f"one of {', '.join(FLOWS)}"),
    "hidden": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(h) and h >= 1 for h in v),
               "a non-empty list of positive layer widths, e.g. [64, 64]"),
    "activation": (lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
    "stochastic": (lambda v: v in STOCHASTIC, "one of mc, mala, langevin, underdamped or null"),
    "lambdas": (lambda v: v is None or isinstance(v, (list, tuple)) and all(_is_number(l) and 0 <= l <= 1 for l in v),
                "null or a list of numbers in [0, 1], one per block"),
    "n_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "step_size": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "augment": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "masks": (lambda v: v in MASKS, f"one of {', '.join(MASKS)}"),
    "n_bins": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "spline_bound": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "friction": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "target_acceptance": (lambda v: v is None or _is_number(v) and 0 < v < 1, "null or a number in (0, 1)"),
}


def check_snf_options(options: dict, where: str = "model") -> None:
    """Raise ValueError naming the first unknown key or bad value among :func:`build_snf`'s keyword options."""
    if not isinstance(options, dict):
        raise ValueError(f"{where}: expected a mapping of build_snf options, got {options!r}")
    for key, value in options.items():
        if key not in _OPTION_CHECKS:
            raise ValueError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(_OPTION_CHECKS))}")
        valid, wanted = _OPTION_CHECKS[key]
        if not valid(value):
            raise ValueError(f"{where}.{key} must be {wanted}, got {value!r}")
    lambdas, n_blocks = options.get("lambdas"), options.get("n_blocks", 5)
    if lambdas is not None and len(lambdas) != n_blocks:
        raise ValueError(f"{where}.lambdas has {len(lambdas)} entries but n_blocks is {n_blocks}")


#: options added after models were first saved, with the value that reproduces those models
_SAVED_BEFORE = {"masks": "halves"}


def saved_snf_options(options: dict) -> dict:
    """Options of a saved model (a checkpoint's ``snf_config`` or a run's ``model`` section) with the
    options it predates set to the values it was built with."""
    return {**_SAVED_BEFORE, **options}


def _masks(periodic: torch.Tensor, augment: int, scheme: str, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformed masks (A, ~A) of coupling pair ``pair`` over the D + augment latent dims."""
    dim = periodic.numel()
    first = torch.zeros(dim + augment, dtype=torch.bool)
    if augment:
        first[dim:] = True          # v | q first, then q | v
    elif scheme == "halves" or dim < 4:
        first[: (dim + 1) // 2] = True
    else:
        for group in (torch.nonzero(periodic).flatten(), torch.nonzero(~periodic).flatten()):
            rank = torch.arange(group.numel())
            first[group] = rank % 2 == 0 if pair % 2 == 0 else rank < (group.numel() + 1) // 2
        if first.all() or not first.any():          # e.g. a single dim in each group
            first = torch.arange(dim) % 2 == 0
    return first, ~first


def _stochastic_block(kind, energy, periodic, n_steps, step_size, friction, target_acceptance):
    if kind in ("mc", "mala"):
        block = MetropolisBlock if kind == "mc" else MALABlock
        return block(energy, n_steps=n_steps, step_size=step_size, periodic_mask=periodic,
                     target_acceptance=target_acceptance)
    if kind == "langevin":
        return OverdampedLangevinBlock(energy, n_steps=n_steps, step_size=step_size, periodic_mask=periodic)
    return UnderdampedLangevinBlock(energy, n_steps=n_steps, step_size=step_size, friction=friction,
                                    periodic_mask=periodic)


def build_snf(dim: int, periodic_mask, target_energy, transform=None, *, n_blocks: int = 4,
              flow: str = "realnvp", hidden=(128, 128), activation: str = "relu",
              stochastic: str | None = None, lambdas=None, n_steps: int = 10, step_size: float = 0.1,
              augment: int = 0, masks: str = "alternating", n_bins: int = 8, spline_bound: float = 5.0,
              friction: float = 1.0, target_acceptance: float | None = None) -> SNF:
    """Build an SNF. The defaults are the package's default model (:func:`snf_defaults`, the ``model``
    section of a run's configuration): a RealNVP flow alone, 4 coupling pairs of [128, 128].

    Args:
        dim: latent configuration dims D (e.g. the IC transform's ``.dim``; 2 for the double well).
        periodic_mask: bool (D,) or None; angles in [−π, π).
        target_energy: data-space reduced energy (B, ...) -> (B,).
        transform: optional deterministic block latent (B, D) -> data (e.g. IC -> Cartesian nm).
        n_blocks: coupling pairs K, each followed by a stochastic block when ``stochastic``.
        flow: "realnvp" or "spline"; hidden/activation: conditioner MLPs.
        stochastic: "mc" (random-walk Metropolis), "mala" (Metropolis-adjusted Langevin), "langevin"
            (unadjusted overdamped), "underdamped" or None.
        lambdas: K values in [0, 1]; default linspace(0, 1, K) (just [1] for K = 1).
        n_steps, step_size: per stochastic block (MC proposal width, MALA/Langevin ε or Δt).
        augment: number A of Gaussian auxiliary momenta (0: none).
        masks: "alternating" (default) or "halves" (the paper's); see the module docstring.
        n_bins, spline_bound: spline resolution and interval [−bound, bound] of ordinary dims.
        friction: underdamped Langevin γ. target_acceptance: MC step-size adaptation in training.
    """
    options = dict(n_blocks=n_blocks, flow=flow, hidden=hidden, activation=activation, stochastic=stochastic,
                   lambdas=lambdas, n_steps=n_steps, step_size=step_size, augment=augment, masks=masks, n_bins=n_bins,
                   spline_bound=spline_bound, friction=friction, target_acceptance=target_acceptance)
    check_snf_options(options, "build_snf")
    config = dict(dim=dim, periodic_mask=None if periodic_mask is None else
                  [bool(b) for b in as_periodic_mask(periodic_mask, dim)],
                  **options)
    config.update(hidden=tuple(hidden), lambdas=None if lambdas is None else tuple(float(l) for l in lambdas))
    if lambdas is None:
        lambdas = torch.linspace(0, 1, n_blocks).tolist() if n_blocks > 1 else [1.0]

    periodic = torch.cat([as_periodic_mask(periodic_mask, dim), torch.zeros(augment, dtype=torch.bool)])
    prior = Prior(dim + augment, periodic)
    tail = ([MarginalizeAuxiliary(augment)] if augment else []) + ([transform] if transform is not None else [])
    latent_target = PulledBackEnergy(tail, target_energy)

    blocks = []
    for pair, lam in enumerate(lambdas):
        for mask in _masks(periodic[:dim], augment, masks, pair):
            if flow == "realnvp":
                blocks.append(AffineCoupling(mask, periodic, hidden, activation))
            else:
                blocks.append(SplineCoupling(mask, periodic, hidden, activation, n_bins=n_bins,
                                             bound=spline_bound))
        if stochastic is not None:
            energy = InterpolatedEnergy(prior.energy, latent_target, lam)
            blocks.append(_stochastic_block(stochastic, energy, periodic, n_steps, step_size, friction,
                                            target_acceptance))
    snf = SNF(prior, blocks + tail, target_energy)
    snf.config = config
    return snf


def snf_defaults() -> dict:
    """:func:`build_snf`'s keyword defaults as plain data: the one source of the default model."""
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in inspect.signature(build_snf).parameters.items() if p.kind is p.KEYWORD_ONLY}


def build_snf_from_config(config: dict, target_energy, transform=None) -> SNF:
    """Rebuild an SNF from ``snf.config`` (a dict of :func:`build_snf` arguments)."""
    config = saved_snf_options(config)
    try:
        dim = config.pop("dim")
        periodic_mask = config.pop("periodic_mask", None)
        return build_snf(dim, periodic_mask, target_energy, transform, **config)
    except (KeyError, TypeError) as error:
        raise ValueError(f"invalid SNF config {sorted(config)}: {error}") from error

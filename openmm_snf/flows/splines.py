"""Monotonic rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows"), element-wise.

Two flavours share the maths:

* bounded on [−B, B] with identity (linear) tails outside — for ordinary dimensions;
* circular on [−π, π) (Rezende et al. 2020, "Normalizing flows on tori and spheres"): the
  derivatives at −π and π are equal, so the map is a smooth bijection of the circle.

Unnormalized parameters have a trailing axis: widths and heights K each, derivatives K − 1
(bounded; the end derivatives are 1) or K (circular; the shared end derivative is the last one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rq_spline"]

MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(_DERIVATIVE_OFFSET) = 1 − MIN_DERIVATIVE: zero parameters give unit slopes (the identity)
_DERIVATIVE_OFFSET = math.log(math.expm1(1 - MIN_DERIVATIVE))


def _bins_first(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (K, ...) contiguous (a view where ``t`` is laid out so already): on CPU, reductions over a
    leading axis of a few bins run several times faster than over the last one, and per-bin slices are contiguous."""
    return t.movedim(-1, 0).contiguous()


def _knots(unnormalized: torch.Tensor, left: float, right: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots (K + 1, ...) from ``left`` to ``right`` and bin sizes (K, ...) from unnormalized sizes (K, ...)."""
    n_bins = unnormalized.shape[0]
    e = torch.exp(unnormalized - unnormalized.amax(0, keepdim=True))
    fractions = MIN_BIN + (1 - MIN_BIN * n_bins) * (e / e.sum(0, keepdim=True))
    inner = left + (right - left) * torch.cumsum(fractions[:-1], dim=0)
    knots = torch.cat([torch.full_like(inner[:1], left), inner, torch.full_like(inner[:1], right)])
    return knots, knots[1:] - knots[:-1]


def _derivatives(unnormalized: torch.Tensor, circular: bool) -> torch.Tensor:
    """Knot derivatives (K + 1, ...) from unnormalized inner ones (K − 1, ..., or K, ... when circular)."""
    inner = MIN_DERIVATIVE + F.softplus(unnormalized + _DERIVATIVE_OFFSET)
    if circular:
        return torch.cat([inner[-1:], inner])
    ones = torch.ones_like(inner[:1])
    return torch.cat([ones, inner, ones])


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(0, index[None])[0]


def rq_spline(x, widths, heights, derivatives, *, inverse: bool = False, circular: bool = False,
              bound: float = 5.0):
    """Apply a rational-quadratic spline element-wise.

    Args:
        x: (..., n) inputs.
        widths, heights: (..., n, K) unnormalized bin sizes.
        derivatives: (..., n, K − 1) or (..., n, K) when ``circular``, unnormalized.
        inverse: apply the inverse map instead.
        circular: spline on [−π, π) with matching end derivatives (inputs must lie there).
        bound: half-width B of the spline interval for the non-circular case.

    Returns:
        (y, logabsdet) of shapes (..., n): the output and log|dy/dx| of the direction applied.
    """
    left, right = (-math.pi, math.pi) if circular else (-bound, bound)
    xk, wk = _knots(_bins_first(widths), left, right)
    yk, hk = _knots(_bins_first(heights), left, right)
    dk = _derivatives(_bins_first(derivatives), circular)

    xc = x.clamp(left, right)
    grid = yk if inverse else xk
    index = (xc >= grid[1:-1]).sum(0)  # the bin: how many inner knots lie at or below xc

    x_lo, w = _gather(xk, index), _gather(wk, index)
    y_lo, h = _gather(yk, index), _gather(hk, index)
    d_lo, d_hi = _gather(dk, index), _gather(dk, index + 1)
    s = h / w
    two_s = d_hi + d_lo - 2 * s

    if inverse:
        dy = xc - y_lo
        a = h * (s - d_lo) + dy * two_s
        b = h * d_lo - dy * two_s
        c = -s * dy
        disc = (b ** 2 - 4 * a * c).clamp_min(0.0)
        xi = (2 * c) / (-b - torch.sqrt(disc))
        xi = xi.clamp(0.0, 1.0)
        out = x_lo + xi * w
    else:
        xi = ((xc - x_lo) / w).clamp(0.0, 1.0)
        out = y_lo + h * (s * xi ** 2 + d_lo * xi * (1 - xi)) / (s + two_s * xi * (1 - xi))

    one_minus = 1 - xi
    denom = s + two_s * xi * one_minus
    deriv_num = s ** 2 * (d_hi * xi ** 2 + 2 * s * xi * one_minus + d_lo * one_minus ** 2)
    logdet = torch.log(deriv_num) - 2 * torch.log(denom)
    if inverse:
        logdet = -logdet
    if circular:
        return out, logdet
    inside = (x >= left) & (x <= right)
    return torch.where(inside, out, x), torch.where(inside, logdet, torch.zeros_like(logdet))

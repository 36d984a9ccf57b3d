"""Coupling blocks: affine (RealNVP) and rational-quadratic spline (NSF), periodic-aware.

A coupling block splits the D dimensions with a boolean ``transformed_mask``: the masked dims are
transformed element-wise with parameters predicted by an MLP (the *conditioner*) from the other
dims, which pass through unchanged. Periodic conditioning dims enter the MLP as (cos, sin).

Periodic transformed dims stay on the circle: the affine coupling applies only a rotation
(shift mod 2π, log-det 0) to them; the spline coupling applies a circular spline followed by a
rotation. Conditioners start with a zero last layer, so a fresh block is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Block, wrap_angle
from .priors import as_periodic_mask
from .splines import n_derivatives, rq_spline

__all__ = ["MLP", "AffineCoupling", "SplineCoupling"]

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """Dense network in -> hidden... -> out with the named activation; last layer zero-initialized."""

    def __init__(self, n_in: int, n_out: int, hidden=(64, 64), activation: str = "relu"):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        sizes = [n_in, *hidden]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
        last = nn.Linear(sizes[-1], n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class _Coupling(Block):
    """Shared machinery: index bookkeeping, conditioner features and reassembly."""

    def __init__(self, transformed_mask, periodic_mask, n_params: int, hidden, activation):
        super().__init__()
        transformed = torch.as_tensor(transformed_mask, dtype=torch.bool).flatten()
        dim = transformed.numel()
        if not transformed.any() or transformed.all():
            raise ValueError("transformed_mask must select some but not all dimensions")
        periodic = as_periodic_mask(periodic_mask, dim)
        self.dim = dim
        self.register_buffer("transformed_idx", torch.nonzero(transformed).flatten())
        self.register_buffer("condition_idx", torch.nonzero(~transformed).flatten())
        self.register_buffer("condition_periodic", periodic[~transformed])
        self.register_buffer("transformed_periodic", periodic[transformed])
        n_features = int((~transformed).sum()) + int(periodic[~transformed].sum())
        self.n_params = n_params
        self.conditioner = MLP(n_features, int(transformed.sum()) * n_params, hidden, activation)

    def _features(self, x_cond: torch.Tensor) -> torch.Tensor:
        if not self.condition_periodic.any():
            return x_cond
        angles = x_cond[:, self.condition_periodic]
        plain = x_cond[:, ~self.condition_periodic]
        return torch.cat([plain, torch.cos(angles), torch.sin(angles)], dim=-1)

    def _couple(self, x: torch.Tensor, inverse: bool):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects (B, {self.dim}), got {tuple(x.shape)}")
        x_cond = x[:, self.condition_idx]
        params = self.conditioner(self._features(x_cond))
        params = params.view(x.shape[0], self.transformed_idx.numel(), self.n_params)
        y_t, logdet = self._transform(x[:, self.transformed_idx], params, inverse)
        y = x.index_copy(1, self.transformed_idx, y_t)
        return y, logdet.sum(-1)

    def forward(self, x: torch.Tensor):
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor):
        return self._couple(y, inverse=True)


class AffineCoupling(_Coupling):
    """RealNVP coupling y = x·exp(s) + t on ordinary dims, y = wrap(x + t) on periodic dims.

    Args:
        transformed_mask: bool (D,), the dims this block changes.
        periodic_mask: bool (D,) or None.
        hidden: conditioner hidden sizes; activation: "relu", "silu", "tanh" or "gelu".
        scale_limit: log-scales are soft-clipped to (−limit, limit) by limit·tanh(s/limit).
    """

    def __init__(self, transformed_mask, periodic_mask=None, hidden=(64, 64), activation="relu",
                 scale_limit: float = 5.0):
        super().__init__(transformed_mask, periodic_mask, 2, hidden, activation)
        self.scale_limit = float(scale_limit)

    def _transform(self, x, params, inverse):
        raw_scale, shift = params[..., 0], params[..., 1]
        log_scale = self.scale_limit * torch.tanh(raw_scale / self.scale_limit)
        log_scale = torch.where(self.transformed_periodic, torch.zeros_like(log_scale), log_scale)
        if inverse:
            y = (x - shift) * torch.exp(-log_scale)
            logdet = -log_scale
        else:
            y = x * torch.exp(log_scale) + shift
            logdet = log_scale
        y = torch.where(self.transformed_periodic, wrap_angle(y), y)
        return y, logdet


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling; circular splines (+ rotation) on periodic dims.

    Args:
        transformed_mask, periodic_mask, hidden, activation: as for :class:`AffineCoupling`.
        n_bins: spline bins K.
        bound: ordinary dims are splined on [−bound, bound], identity outside.
    """

    def __init__(self, transformed_mask, periodic_mask=None, hidden=(64, 64), activation="relu",
                 n_bins: int = 8, bound: float = 5.0):
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        super().__init__(transformed_mask, periodic_mask, 3 * n_bins + 1, hidden, activation)
        self.n_bins = int(n_bins)
        self.bound = float(bound)

    def _transform(self, x, params, inverse):
        k = self.n_bins
        y = torch.empty_like(x)
        logdet = torch.empty_like(x)
        for circular in (False, True):
            cols = self.transformed_periodic == circular
            if not cols.any():
                continue
            p = params[:, cols]
            widths, heights = p[..., :k], p[..., k:2 * k]
            derivs = p[..., 2 * k:2 * k + n_derivatives(k, circular)]
            xs = x[:, cols]
            if circular and inverse:
                xs = wrap_angle(xs - p[..., -1])
            ys, ld = rq_spline(xs, widths, heights, derivs, inverse=inverse, circular=circular,
                               bound=self.bound)
            if circular and not inverse:
                ys = wrap_angle(ys + p[..., -1])
            y[:, cols] = ys
            logdet[:, cols] = ld
        return y, logdet

"""Coupling blocks: affine (RealNVP) and rational-quadratic spline (NSF), periodic-aware.

A coupling block splits the D dimensions with a boolean ``transformed_mask``: the masked dims are
transformed element-wise with parameters predicted by an MLP (the *conditioner*) from the other
dims, which pass through unchanged. Periodic conditioning dims enter the MLP as (cos, sin).

Periodic transformed dims stay on the circle. An affine map cannot reshape a density on a circle
(any scaling breaks periodicity), so *both* couplings transform periodic dims with a circular
rational-quadratic spline followed by a rotation; they differ on ordinary dims (affine vs spline).
Conditioners start with a zero last layer, so a fresh block is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Block, wrap_angle
from .priors import as_periodic_mask
from .splines import rq_spline

__all__ = ["MLP", "AffineCoupling", "SplineCoupling"]

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """Dense network in -> hidden... -> out with the named activation; last layer zero-initialized."""

    def __init__(self, n_in: int, n_out: int, hidden=(64, 64), activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [n_in, *hidden]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        last = nn.Linear(sizes[-1], n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class _Coupling(Block):
    """Shared machinery: index bookkeeping, conditioner features, circular part and reassembly.

    Subclasses set ``n_ordinary_params`` and implement ``_transform_ordinary(x, params, inverse)``.
    """

    n_ordinary_params: int

    def __init__(self, transformed_mask, periodic_mask, hidden, activation, n_bins: int):
        super().__init__()
        transformed = torch.as_tensor(transformed_mask, dtype=torch.bool).flatten()
        dim = transformed.numel()
        if not transformed.any() or transformed.all():
            raise ValueError("transformed_mask must select some but not all dimensions")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        periodic = as_periodic_mask(periodic_mask, dim)
        self.dim, self.n_bins = dim, int(n_bins)
        self.register_buffer("condition_idx", torch.nonzero(~transformed).flatten())
        self.register_buffer("condition_periodic", periodic[~transformed])
        self.register_buffer("ordinary_idx", torch.nonzero(transformed & ~periodic).flatten())
        self.register_buffer("periodic_idx", torch.nonzero(transformed & periodic).flatten())
        # the conditioner's inputs, plain dims then angles, from the two condition_* buffers (checkpoints hold
        # those); taken with index_select, several times faster than x[:, idx] on CPU
        self.register_buffer("_plain_idx", self.condition_idx[~self.condition_periodic], persistent=False)
        self.register_buffer("_angle_idx", self.condition_idx[self.condition_periodic], persistent=False)
        self.n_periodic_params = 3 * self.n_bins + 1
        n_features = int((~transformed).sum()) + int(periodic[~transformed].sum())
        n_out = (self.ordinary_idx.numel() * self.n_ordinary_params
                 + self.periodic_idx.numel() * self.n_periodic_params)
        self.conditioner = MLP(n_features, n_out, hidden, activation)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The conditioner's input from the full x (B, D): the plain conditioning dims, then cos and sin of the
        periodic ones."""
        plain = x.index_select(1, self._plain_idx)
        if not self._angle_idx.numel():
            return plain
        angles = x.index_select(1, self._angle_idx)
        return torch.cat([plain, torch.cos(angles), torch.sin(angles)], dim=-1)

    def _transform_periodic(self, x, params, inverse):
        """Circular spline then rotation (forward); params (B, n, 3K + 1)."""
        k = self.n_bins
        params = params.movedim(-1, 0).contiguous().movedim(0, -1)  # one copy to the splines' bins-first layout
        widths, heights, derivs, rotation = params[..., :k], params[..., k:2 * k], params[..., 2 * k:3 * k], params[..., -1]
        if inverse:
            x = wrap_angle(x - rotation)
        y, logdet = rq_spline(x, widths, heights, derivs, inverse=inverse, circular=True)
        if not inverse:
            y = wrap_angle(y + rotation)
        return y, logdet

    def _couple(self, x: torch.Tensor, inverse: bool):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects (B, {self.dim}), got {tuple(x.shape)}")
        params = self.conditioner(self._features(x))
        n_ord = self.ordinary_idx.numel() * self.n_ordinary_params
        y, logdet = x, x.new_zeros(x.shape[0])
        for idx, p, fn in ((self.ordinary_idx, params[:, :n_ord], self._transform_ordinary),
                           (self.periodic_idx, params[:, n_ord:], self._transform_periodic)):
            if idx.numel():
                out, ld = fn(x.index_select(1, idx), p.reshape(x.shape[0], idx.numel(), -1), inverse)
                y = y.index_copy(1, idx, out)
                logdet = logdet + ld.sum(-1)
        return y, logdet

    def forward(self, x: torch.Tensor):
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor):
        return self._couple(y, inverse=True)


class AffineCoupling(_Coupling):
    """RealNVP coupling y = x·exp(s) + t on ordinary dims; circular spline + rotation on periodic dims.

    Args:
        transformed_mask: bool (D,), the dims this block changes.
        periodic_mask: bool (D,) or None.
        hidden: conditioner hidden sizes; activation: "relu", "silu", "tanh" or "gelu".
        scale_limit: log-scales are soft-clipped to (−limit, limit) by limit·tanh(s/limit).
        n_bins: bins of the circular splines on periodic dims.
    """

    n_ordinary_params = 2

    def __init__(self, transformed_mask, periodic_mask=None, hidden=(64, 64), activation="relu",
                 scale_limit: float = 5.0, n_bins: int = 8):
        super().__init__(transformed_mask, periodic_mask, hidden, activation, n_bins)
        self.scale_limit = float(scale_limit)

    def _transform_ordinary(self, x, params, inverse):
        log_scale = self.scale_limit * torch.tanh(params[..., 0] / self.scale_limit)
        shift = params[..., 1]
        if inverse:
            return (x - shift) * torch.exp(-log_scale), -log_scale
        return x * torch.exp(log_scale) + shift, log_scale


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling; circular splines (+ rotation) on periodic dims.

    Args:
        transformed_mask, periodic_mask, hidden, activation: as for :class:`AffineCoupling`.
        n_bins: spline bins K.
        bound: ordinary dims are splined on [−bound, bound], identity outside.
    """

    def __init__(self, transformed_mask, periodic_mask=None, hidden=(64, 64), activation="relu",
                 n_bins: int = 8, bound: float = 5.0):
        self.n_ordinary_params = 3 * int(n_bins) - 1
        super().__init__(transformed_mask, periodic_mask, hidden, activation, n_bins)
        self.bound = float(bound)

    def _transform_ordinary(self, x, params, inverse):
        k = self.n_bins
        params = params.movedim(-1, 0).contiguous().movedim(0, -1)  # one copy to the splines' bins-first layout
        return rq_spline(x, params[..., :k], params[..., k:2 * k], params[..., 2 * k:], inverse=inverse,
                         bound=self.bound)

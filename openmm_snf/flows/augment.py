"""Augmented momenta (the paper's alanine dipeptide model): Gaussian auxiliary dimensions.

The latent state is (q, v) with v ∈ R^A; couplings mix q and v, stochastic blocks sample
u(q) + ½|v|² jointly. :class:`MarginalizeAuxiliary` ends the augmented part: forward drops v
(deterministic), and its ΔS = log N(v; 0, I) is exactly the weight of the backward kernel that
would redraw v, so the SNF's weights target p_X(q) · N(v) whose q-marginal is p_X. The inverse
draws v ~ N(0, I) and returns −log N(v), making the inverse-path likelihood the usual variational
bound log q(x) ≥ E_v[log q(x, v) − log N(v)].
"""
from __future__ import annotations

import math

import torch

from .base import Block

__all__ = ["MarginalizeAuxiliary"]


class MarginalizeAuxiliary(Block):
    """(B, D + A) -> (B, D): drop the last A auxiliary dims; inverse appends fresh N(0, I) ones."""

    stochastic = True

    def __init__(self, aux_dim: int):
        super().__init__()
        if aux_dim < 1:
            raise ValueError(f"aux_dim must be >= 1, got {aux_dim}")
        self.aux_dim = int(aux_dim)
        self._log_norm = 0.5 * self.aux_dim * math.log(2 * math.pi)

    def _log_normal(self, v):
        return -0.5 * (v ** 2).sum(-1) - self._log_norm

    def forward(self, x, *, generator: torch.Generator | None = None):
        if x.ndim != 2 or x.shape[1] <= self.aux_dim:
            raise ValueError(f"MarginalizeAuxiliary expects (B, D + {self.aux_dim}), got {tuple(x.shape)}")
        q, v = x[:, :-self.aux_dim], x[:, -self.aux_dim:]
        return q, self._log_normal(v)

    def inverse(self, y, *, generator: torch.Generator | None = None):
        v = torch.randn(y.shape[0], self.aux_dim, generator=generator, dtype=y.dtype, device=y.device)
        return torch.cat([y, v], dim=-1), -self._log_normal(v)

    def extra_repr(self) -> str:
        return f"aux_dim={self.aux_dim}"

"""Volume-preserving and per-dimension blocks: permutations and actnorm."""
from __future__ import annotations

import torch
from torch import nn

from .base import Block
from .priors import as_periodic_mask

__all__ = ["Permute", "ActNorm", "Reshape"]


class Permute(Block):
    """y = x[:, perm] (forward), log-det 0. Periodic masks must be permuted alongside by the caller."""

    def __init__(self, perm):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long).flatten()
        if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
            raise ValueError(f"perm must be a permutation of 0..{perm.numel() - 1}, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    @classmethod
    def swap(cls, dim: int) -> "Permute":
        """The half swap: second half first, then the first half."""
        half = (dim + 1) // 2
        return cls(list(range(half, dim)) + list(range(half)))

    def forward(self, x):
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y[:, self.inverse_perm], y.new_zeros(y.shape[0])


class ActNorm(Block):
    """Per-dimension affine map y = x·exp(log_scale) + shift on ordinary dims (periodic dims pass).

    ``initialize(data)`` sets shift and scale to the data's mean and standard deviation, so the
    inverse direction whitens the data (ActNorm of Glow, used here as a learnable whitening).
    """

    def __init__(self, dim: int, periodic_mask=None):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("ordinary", ~as_periodic_mask(periodic_mask, dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def initialize(self, data: torch.Tensor) -> None:
        """Set shift/log_scale from latent-space data (N, D) so the inverse standardizes it."""
        if data.ndim != 2 or data.shape[1] != self.dim or data.shape[0] < 2:
            raise ValueError(f"ActNorm.initialize expects (N >= 2, {self.dim}), got {tuple(data.shape)}")
        self.shift.copy_(torch.where(self.ordinary, data.mean(0), 0.0).to(self.shift))
        std = data.std(0).clamp_min(1e-6)
        self.log_scale.copy_(torch.where(self.ordinary, torch.log(std), 0.0).to(self.log_scale))

    def _params(self, x):
        zero = torch.zeros_like(self.log_scale)
        log_scale = torch.where(self.ordinary, self.log_scale, zero).to(x.dtype)
        return log_scale, torch.where(self.ordinary, self.shift, zero).to(x.dtype)

    def forward(self, x):
        log_scale, shift = self._params(x)
        return x * torch.exp(log_scale) + shift, log_scale.sum().expand(x.shape[0])

    def inverse(self, y):
        log_scale, shift = self._params(y)
        return (y - shift) * torch.exp(-log_scale), (-log_scale.sum()).expand(y.shape[0])


class Reshape(Block):
    """(B, D) -> (B, *shape) with log-det 0, e.g. a 3-D latent to one particle's (B, 1, 3) in nm."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.dim = 1
        for s in self.shape:
            self.dim *= s

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Reshape expects (B, {self.dim}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], *self.shape), x.new_zeros(x.shape[0])

    def inverse(self, y):
        if tuple(y.shape[1:]) != self.shape:
            raise ValueError(f"Reshape.inverse expects (B, {self.shape}), got {tuple(y.shape)}")
        return y.reshape(y.shape[0], self.dim), y.new_zeros(y.shape[0])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"

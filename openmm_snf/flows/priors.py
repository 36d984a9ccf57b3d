"""Latent priors: standard normal on ordinary dimensions, uniform on [−π, π) on periodic ones.

A uniform prior on torsions matches the circular splines and the wrapped Metropolis/Langevin moves:
every map stays on the torus, so no density leaks across ±π. The prior energy is normalized,
u_Z(z) = −log p_Z(z), so that importance weights estimate Z_X itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Prior", "as_periodic_mask"]


def as_periodic_mask(periodic_mask, dim: int) -> torch.Tensor:
    """Validate a periodic mask (None, bool sequence or tensor) into a bool tensor (dim,)."""
    if periodic_mask is None:
        return torch.zeros(dim, dtype=torch.bool)
    mask = torch.as_tensor(periodic_mask, dtype=torch.bool).flatten().cpu()
    if mask.numel() != dim:
        raise ValueError(f"periodic_mask has {mask.numel()} entries but the latent space has dim={dim}")
    return mask


class Prior(nn.Module):
    """Product of N(0, 1) on ordinary dims and U[−π, π) on periodic dims.

    Args:
        dim: number of latent dimensions D.
        periodic_mask: bool (D,), True for angles in radians; None for none.

    Sampling follows the module's dtype/device (move it with ``.to``).
    """

    def __init__(self, dim: int, periodic_mask=None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"Prior dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.register_buffer("periodic_mask", as_periodic_mask(periodic_mask, dim))
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.get_default_dtype()))
        n_periodic = int(self.periodic_mask.sum())
        n_normal = self.dim - n_periodic
        self._log_norm = 0.5 * n_normal * math.log(2 * math.pi) + n_periodic * math.log(2 * math.pi)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw (n, D) latent samples."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        if self.periodic_mask.any():
            u = torch.rand(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
            z = torch.where(self.periodic_mask, (2 * u - 1) * math.pi, z)
        return z

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized reduced energy −log p_Z(z), shape (B,), dtype of z."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"Prior.energy expects (B, {self.dim}), got {tuple(z.shape)}")
        sq = torch.where(self.periodic_mask, torch.zeros_like(z), z) ** 2
        return 0.5 * sq.sum(-1) + self._log_norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.energy(z)

"""Optional, explicit regularization of reduced energies for training losses only.

Importance weights and every reported estimate use the raw energies; these functions only tame the
gradients of a loss when a flow still produces clashing, very high-energy samples.
"""
from __future__ import annotations

import torch

__all__ = ["linlogcut", "clip_forces"]


def linlogcut(u: torch.Tensor, high: float = 500.0, max: float = 1e4) -> torch.Tensor:  # noqa: A002 - field's name
    """Linear below ``high``, logarithmic above it, constant above ``max`` (all in kT).

    ``u`` (B,) reduced energies -> (B,) with ``u`` for u <= high and ``high + log(1 + min(u, max) - high)``
    above it; differentiable (gradient 0 beyond ``max``); nan stays nan, +inf becomes the cap.
    """
    if not high < max:
        raise ValueError(f"linlogcut needs high < max, got high={high}, max={max}")
    capped = torch.clamp(u, max=max)
    return torch.where(capped > high, high + torch.log1p((capped - high).clamp(min=0.0)), capped)


def clip_forces(forces: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's forces (B, n_atoms, 3) down so that no atom's force exceeds ``max_norm`` (kT/nm)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = forces.norm(dim=-1, keepdim=True).amax(dim=-2, keepdim=True)
    return forces * torch.clamp(max_norm / norm, max=1.0)

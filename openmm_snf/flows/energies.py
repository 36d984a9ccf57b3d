"""Energy objects on which the stochastic blocks act, and small analytic targets.

An *energy* is any callable ``u(y) -> (B,)`` of reduced energies (dimensionless, u = U/kT) that
torch can differentiate: an analytic function, the OpenMM bridge, or a composition of both:

* :class:`PulledBackEnergy` carries a data-space energy into the space where a block sits,
  u(y) = u_target(T(y)) − log|det J_T(y)| for the deterministic transforms T that follow;
* :class:`InterpolatedEnergy` is u_λ = (1 − λ) u_prior + λ u_target (the paper's schedule).

Forces come from autograd (:func:`energy_and_gradient`), so the same Metropolis and Langevin code
runs in internal coordinates and in Cartesians.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Energy, FlowBlock, push_forward

__all__ = ["PulledBackEnergy", "InterpolatedEnergy", "GaussianEnergy", "DoubleWellEnergy",
           "energy_and_gradient"]


def energy_and_gradient(energy: Energy, y: torch.Tensor, *, create_graph: bool = False):
    """Evaluate u(y) (B,) and ∇u(y) (same shape as y) by autograd.

    With ``create_graph=False`` the gradient is a constant (detached): it costs one backward pass and
    never needs second derivatives (which the OpenMM bridge does not provide). With ``True`` the
    gradient is part of the graph so that training can differentiate through it.
    """
    with torch.enable_grad():
        if create_graph and y.requires_grad:
            leaf = y
        else:
            leaf = y.detach().requires_grad_(True)
        u = energy(leaf)
        (grad,) = torch.autograd.grad(u.sum(), leaf, create_graph=create_graph)
    if not create_graph:
        return u.detach(), grad.detach()
    return u, grad


class PulledBackEnergy(nn.Module):
    """u(y) = energy(T(y)) − Σ log|det J| of the deterministic forward maps ``transforms``.

    Args:
        transforms: sequence of blocks applied in the sampling direction (e.g. the IC transform);
            their forward must be deterministic. Empty means the identity.
        energy: callable on the data space returning reduced energies (B,).
    """

    def __init__(self, transforms: list[FlowBlock], energy: Energy):
        super().__init__()
        self.transforms = nn.ModuleList(list(transforms))
        self.energy = energy

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x, logdet = push_forward(self.transforms, y)
        return self.energy(x).to(logdet.dtype) - logdet


class InterpolatedEnergy(nn.Module):
    """u_λ(y) = (1 − λ) u_prior(y) + λ u_target(y); a term with zero weight is not evaluated."""

    def __init__(self, prior_energy: Energy, target_energy: Energy, lam: float):
        super().__init__()
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"interpolation parameter lambda must lie in [0, 1], got {lam}")
        self.prior_energy = prior_energy
        self.target_energy = target_energy
        self.lam = float(lam)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        u_prior = None if self.lam == 1.0 else self.prior_energy(y)
        u_target = None if self.lam == 0.0 else self.target_energy(y)
        return self.mix(u_prior, u_target)

    def mix(self, prior_term: torch.Tensor | None, target_term: torch.Tensor | None) -> torch.Tensor:
        """(1 − λ) prior_term + λ target_term, in the target term's dtype: u_λ from the two energies, or ∇u_λ
        from the two gradients (a term with zero weight is not used and may be None)."""
        if self.lam == 0.0:
            return prior_term
        if self.lam == 1.0:
            return target_term
        return (1.0 - self.lam) * prior_term.to(target_term.dtype) + self.lam * target_term

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class GaussianEnergy(nn.Module):
    """Unnormalized Gaussian u(x) = ½ (x − μ)ᵀ Σ⁻¹ (x − μ) on (B, D); ``log_z`` is exact."""

    def __init__(self, mean, covariance):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        if cov.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"covariance must be ({mean.numel()}, {mean.numel()}), got {tuple(cov.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("precision", torch.linalg.inv(cov))
        self.log_z = float(0.5 * mean.numel() * math.log(2 * math.pi) + 0.5 * torch.logdet(cov))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.mean.to(x.dtype)
        return 0.5 * torch.einsum("bi,ij,bj->b", d, self.precision.to(x.dtype), d)


class DoubleWellEnergy(nn.Module):
    """The paper's 2-D double well u(x, y) = a x⁴ + b x² + c x + ½ d y², (B, 2) -> (B,).

    Defaults give u = x⁴ − 6x² − 0.5x + 0.5y², the shipped ``double_well`` system in reduced units.
    """

    def __init__(self, a: float = 1.0, b: float = -6.0, c: float = -0.5, d: float = 1.0):
        super().__init__()
        self.a, self.b, self.c, self.d = float(a), float(b), float(c), float(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"DoubleWellEnergy expects (B, 2), got {tuple(x.shape)}")
        x1, x2 = x[:, 0], x[:, 1]
        return self.a * x1 ** 4 + self.b * x1 ** 2 + self.c * x1 + 0.5 * self.d * x2 ** 2

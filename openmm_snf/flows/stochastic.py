"""Stochastic blocks (the paper's Sec. 3–4): Metropolis MC (random walk or Langevin proposals, MALA),
overdamped and underdamped Langevin.

Each block runs a few steps of a Markov kernel that leaves p_λ ∝ exp(−u_λ) invariant, where
``energy`` is u_λ in the space where the block sits (build it with
:class:`~openmm_snf.flows.energies.InterpolatedEnergy` and
:class:`~openmm_snf.flows.energies.PulledBackEnergy`). Every block returns the exact log
path-probability ratio ΔS = log q̃(input | output) − log q(output | input) of the steps it took:

* Metropolis and MALA (detailed balance): ΔS = u_λ(out) − u_λ(in);
* overdamped Langevin y' = y − ε∇u(y) + √(2ε) η: ΔS = Σ ½(|η|² − |η̃|²) with the
  reconstructed backward noise η̃ = (y − y' + ε∇u(y')) / √(2ε);
* underdamped Langevin, BAOAB with unit masses and velocities drawn fresh at the start and
  discarded at the end: ΔS = ½|v₀|² − ½|v_K|² + Σ_O ½(|v_after|² − |v_before|²).

All these kernels are their own time reverse, so ``inverse`` runs the same kernel and returns its
ΔS; the SNF never needs to know which kind a block is. Noise is drawn on the input's device and
dtype from the optional ``generator``.

Periodic dims (bool mask over the last axis of (B, D) inputs) are wrapped into [−π, π); the
overdamped backward noise uses the minimum-image displacement, i.e. the nearest term of the wrapped
Gaussian, whose neglected images weigh exp(−π²/(4ε)) relative (< 1e-20 for ε ≤ 0.05).

Step sizes may adapt during training (``target_acceptance``; Metropolis and MALA blocks): after each
forward in training mode the step is multiplied by exp(rate·(acceptance − target)). In eval mode
(sampling) it is frozen; it is a buffer, so checkpoints keep it.
"""
from __future__ import annotations

import math

import torch

from .base import Block, Energy, wrap_angle
from .energies import energy_and_gradient

__all__ = ["MALABlock", "MetropolisBlock", "OverdampedLangevinBlock", "UnderdampedLangevinBlock", "metropolis_accept"]


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension, in float64 (path terms are accumulated in float64)."""
    return t.flatten(1).to(torch.float64).sum(-1)


def metropolis_accept(u, u_proposal, log_q_ratio, generator, dtype) -> torch.Tensor:
    """Which of the B proposals (bool (B,)) the Metropolis-Hastings rule accepts, given the energies of the current
    states and the proposals (B,) and log q(current | proposal) − log q(proposal | current) (B,); draws B uniforms
    of ``dtype``. From a state of infinite energy any valid (finite) proposal is accepted."""
    valid = torch.isfinite(u_proposal) & torch.isfinite(log_q_ratio)
    log_ratio = torch.where(valid, u - u_proposal + log_q_ratio, torch.full_like(u, -math.inf))
    uniform = torch.rand(u.shape[0], generator=generator, dtype=dtype, device=u.device)
    return torch.log(uniform) < log_ratio


class _StochasticBlock(Block):
    stochastic = True
    kind: str  # the builder's name of the kernel; names the block's acceptance rate (``SNF.acceptance_rates``)

    def __init__(self, energy: Energy, n_steps: int, step_size: float, periodic_mask=None):
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.energy = energy
        self.n_steps = int(n_steps)
        self.register_buffer("step_size", torch.tensor(float(step_size), dtype=torch.float64))
        mask = None if periodic_mask is None else torch.as_tensor(periodic_mask, dtype=torch.bool)
        self.register_buffer("periodic_mask", mask if mask is not None and mask.any() else None)
        self.last_acceptance = float("nan")

    def _noise(self, y, generator):
        return torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)

    def _wrap(self, y):
        if self.periodic_mask is None:
            return y
        return torch.where(self.periodic_mask, wrap_angle(y), y)

    def _displacement(self, a, b):
        """a − b, minimum image on periodic dims."""
        return self._wrap(a - b)

    def forward(self, x, *, generator: torch.Generator | None = None):
        return self._run(x, generator)

    def inverse(self, y, *, generator: torch.Generator | None = None):
        return self._run(y, generator)

    def extra_repr(self) -> str:
        return f"n_steps={self.n_steps}, step_size={float(self.step_size):.4g}"


class MetropolisBlock(_StochasticBlock):
    """Metropolis MC with isotropic Gaussian proposals of width ``step_size``.

    Args:
        energy: u_λ(y) -> (B,) on this block's space.
        n_steps: Metropolis steps per pass (the paper: 20).
        step_size: proposal standard deviation in the block's units (the paper: 0.1).
        periodic_mask: bool over the last axis, proposals wrapped there.
        target_acceptance: if set, adapt the step size toward it while training.
        adapt_rate: rate of that adaptation.
    """

    kind = "mc"

    def __init__(self, energy: Energy, n_steps: int = 20, step_size: float = 0.1, periodic_mask=None,
                 target_acceptance: float | None = None, adapt_rate: float = 0.1):
        super().__init__(energy, n_steps, step_size, periodic_mask)
        if target_acceptance is not None and not 0 < target_acceptance < 1:
            raise ValueError(f"target_acceptance must lie in (0, 1), got {target_acceptance}")
        self.target_acceptance = target_acceptance
        self.adapt_rate = float(adapt_rate)

    def _run(self, y, generator):
        """The chain runs without autograd; the output is y_chain + (y - y.detach()), i.e. exactly the
        chain's last state with an identity Jacobian with respect to the input (the accepted moves do
        not depend on it), and ΔS = u(out) - u(in) is differentiated through the two end energies
        only: the same gradient as differentiating through every step, at two energy graphs per block
        instead of n_steps + 1."""
        u_start, state = self._start(y)
        with torch.no_grad():
            chain, u = y.detach(), u_start.detach()
            n_accepted = torch.zeros((), dtype=torch.float64, device=y.device)
            for _ in range(self.n_steps):
                chain, u, state, _, accept = self.step(chain, u, state, generator)
                n_accepted = n_accepted + accept.sum()
        acceptance = float(n_accepted) / (self.n_steps * y.shape[0])
        self.last_acceptance = acceptance
        if self.training and self.target_acceptance is not None:
            self.step_size.mul_(math.exp(self.adapt_rate * (acceptance - self.target_acceptance)))
        if torch.is_grad_enabled() and y.requires_grad:
            out = chain + (y - y.detach())
            return out, self.energy(out) - u_start
        return chain, u - u_start

    def step(self, y, u, state, generator, evaluate=None, carried=()):
        """One Metropolis-Hastings step of the chains y (B, ...) with energies u (B,) and kernel state (MALA: ∇u).

        ``evaluate(proposal) -> (u, state, carried)`` gives a proposal's energy, kernel state and any tensors
        (B, ...) the caller carries along with the chains (default: this block's energy, nothing carried).
        Returns the new (y, u, state, carried) and the accepted moves (bool (B,)).
        """
        noise = self._noise(y, generator)
        proposal = self._move(y, state, noise)
        u_proposal, proposal_state, proposal_carried = (evaluate or self._evaluate)(proposal)
        accept = metropolis_accept(u, u_proposal, self._log_q_ratio(y, proposal, proposal_state, noise), generator,
                                   y.dtype)

        def keep(new, old):
            return torch.where(accept.view((-1,) + (1,) * (old.ndim - 1)), new, old)

        state = None if state is None else keep(proposal_state, state)
        carried = tuple(keep(new, old) for new, old in zip(proposal_carried, carried))
        return keep(proposal, y), keep(u_proposal, u), state, carried, accept

    def _start(self, y):
        """u(y) (differentiable while training) and what a proposal needs to know about y besides y and
        its energy (nothing here)."""
        return self.energy(y), None

    def _evaluate(self, y):
        """u(y), the kernel state at y (nothing here) and nothing carried, for :meth:`step`."""
        return self.energy(y), None, ()

    def _move(self, y, state, noise):
        """The proposal made with ``noise`` (B, ...) from y: an isotropic step, wrapped on periodic dims."""
        return self._wrap(y + float(self.step_size) * noise)

    def _log_q_ratio(self, y, proposal, proposal_state, noise):
        """log q(y | proposal) − log q(proposal | y): zero for a symmetric proposal."""
        return torch.zeros((), dtype=torch.float64, device=y.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", target_acceptance={self.target_acceptance}"


class MALABlock(MetropolisBlock):
    """Metropolis-adjusted Langevin: proposals y' = y − ε∇u(y) + √(2ε) η, accepted with the
    Metropolis-Hastings ratio exp(u(y) − u(y')) q(y | y') / q(y' | y). Like Metropolis it satisfies
    detailed balance, so ΔS = u_λ(out) − u_λ(in); unlike unadjusted Langevin it cannot run away where
    forces are huge (such proposals are rejected). Costs a gradient (forces) per step. In training, the
    output and ΔS carry gradients as in :class:`MetropolisBlock` (the chain itself is not differentiated).

    Args: as :class:`MetropolisBlock`, with ``step_size`` the Langevin step ε.
    """

    kind = "mala"

    def _start(self, y):
        """u(y) and ∇u(y); one energy graph when sampling, a second (differentiable) u while training."""
        if torch.is_grad_enabled() and y.requires_grad:
            return self.energy(y), energy_and_gradient(self.energy, y)[1]
        return energy_and_gradient(self.energy, y)

    def _evaluate(self, y):
        return (*energy_and_gradient(self.energy, y), ())

    def _move(self, y, grad, noise):
        eps = float(self.step_size)
        return self._wrap(y - eps * grad + math.sqrt(2 * eps) * noise)

    def _log_q_ratio(self, y, proposal, grad_proposal, noise):
        eps = float(self.step_size)
        backward = (self._displacement(y, proposal) + eps * grad_proposal) / math.sqrt(2 * eps)
        return 0.5 * (_per_sample_sum(noise ** 2) - _per_sample_sum(backward ** 2))


class OverdampedLangevinBlock(_StochasticBlock):
    """Brownian dynamics y' = y − ε∇u(y) + √(2ε) η (reduced units, unit diffusion), no rejection.

    Args:
        energy: u_λ(y) -> (B,).
        n_steps: steps per pass; step_size: ε.
        periodic_mask: bool over the last axis.
        differentiable_forces: keep ∇u in the graph while training (needs second derivatives of the
            energy; the OpenMM bridge has none, so leave it False there). The weights are exact
            either way; only the training gradient is affected.
    """

    kind = "langevin"

    def __init__(self, energy: Energy, n_steps: int = 10, step_size: float = 0.01, periodic_mask=None,
                 differentiable_forces: bool = False):
        super().__init__(energy, n_steps, step_size, periodic_mask)
        self.differentiable_forces = bool(differentiable_forces)

    def _run(self, y, generator):
        eps = float(self.step_size)
        scale = math.sqrt(2 * eps)
        create = self.differentiable_forces and torch.is_grad_enabled()
        _, grad = energy_and_gradient(self.energy, y, create_graph=create)
        delta_s = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
        for _ in range(self.n_steps):
            y_new = self._wrap(y - eps * grad + scale * self._noise(y, generator))
            _, grad_new = energy_and_gradient(self.energy, y_new, create_graph=create)
            eta_forward = (self._displacement(y_new, y) + eps * grad) / scale
            eta_backward = (self._displacement(y, y_new) + eps * grad_new) / scale
            delta_s = delta_s + 0.5 * (_per_sample_sum(eta_forward ** 2) - _per_sample_sum(eta_backward ** 2))
            y, grad = y_new, grad_new
        return y, delta_s


class UnderdampedLangevinBlock(_StochasticBlock):
    """BAOAB Langevin dynamics with unit masses at kT = 1; velocities are marginalized per pass.

    Args:
        energy: u_λ(y) -> (B,).
        n_steps: steps per pass; step_size: time step Δt.
        friction: γ (inverse time units); O-step v ← e^{−γΔt} v + √(1 − e^{−2γΔt}) ξ.
        periodic_mask, differentiable_forces: as for :class:`OverdampedLangevinBlock`.
    """

    kind = "underdamped"

    def __init__(self, energy: Energy, n_steps: int = 10, step_size: float = 0.1, friction: float = 1.0,
                 periodic_mask=None, differentiable_forces: bool = False):
        super().__init__(energy, n_steps, step_size, periodic_mask)
        if not friction > 0:
            raise ValueError(f"friction must be > 0, got {friction}")
        self.friction = float(friction)
        self.differentiable_forces = bool(differentiable_forces)

    def _run(self, y, generator):
        dt = float(self.step_size)
        a = math.exp(-self.friction * dt)
        b = math.sqrt(1 - a * a)
        create = self.differentiable_forces and torch.is_grad_enabled()
        _, grad = energy_and_gradient(self.energy, y, create_graph=create)
        v = self._noise(y, generator)
        delta_s = 0.5 * _per_sample_sum(v ** 2)
        for _ in range(self.n_steps):
            v = v - 0.5 * dt * grad
            y = self._wrap(y + 0.5 * dt * v)
            v_new = a * v + b * self._noise(y, generator)
            delta_s = delta_s + 0.5 * (_per_sample_sum(v_new ** 2) - _per_sample_sum(v ** 2))
            v = v_new
            y = self._wrap(y + 0.5 * dt * v)
            _, grad = energy_and_gradient(self.energy, y, create_graph=create)
            v = v - 0.5 * dt * grad
        return y, delta_s - 0.5 * _per_sample_sum(v ** 2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", friction={self.friction}"

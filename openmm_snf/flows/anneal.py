"""Annealed refinement of a trained flow: Metropolis blocks in its prior space, before the flow.

For a deterministic flow F (couplings, then e.g. the IC transform) with prior u_Z, the target pulled
back into the prior space is u_F(z) = u_X(F(z)) − log|det J_F(z)|. :func:`annealed` returns the SNF

    z ~ prior -> MC(u_λ1) -> MC(u_λ2) -> ... -> MC(u_λK = u_F) -> F -> x,
    u_λ = (1 − λ) u_Z + λ u_F,   λ_k = k / K,

whose SNF weight, log w = u_Z(z_0) − u_X(x) + log|det J_F| + Σ_k [u_λk(out_k) − u_λk(in_k)],
telescopes to the annealed importance sampling weight Σ_k [u_λ(k−1)(z_(k−1)) − u_λk(z_(k−1))]
(Neal 2001): exact for any number of stages and steps. More stages bring the weights closer to
uniform as long as the Metropolis steps keep up; the flow has made the prior space nearly Gaussian, so
isotropic proposals suit it. Each Metropolis step costs one pass of the whole flow and one energy per
sample (no gradients); the stages run as one block, :class:`AnnealingStages`, which carries each chain's
u_Z and u_F from stage to stage, so a stage starts without another pass: K·n_steps + 1 passes per
sample where separate blocks took K·(n_steps + 1). With ``kernel="mala"`` the stages are
Metropolis-adjusted Langevin blocks instead (forces pulled back through the flow by autograd: a
backward pass per step). Measured on alanine dipeptide at 1000 K (README, "Quality"): a RealNVP
flow's ESS 11% -> 59% with 80 stages of 2 Metropolis steps.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Block
from .energies import InterpolatedEnergy, PulledBackEnergy, energy_and_gradient
from .snf import SNF
from .stochastic import MALABlock, MetropolisBlock

__all__ = ["ANNEALING_KERNELS", "AnnealingStages", "annealed"]

#: The stochastic block of each annealing stage: random-walk Metropolis (energies only) or Metropolis-adjusted
#: Langevin (forces too). Unadjusted Langevin is not offered: its weights are exact too, but on alanine
#: dipeptide the pulled-back forces of clashing samples sent ~10-20% of the chains to infinity even at ε = 0.001.
ANNEALING_KERNELS = {"mc": MetropolisBlock, "mala": MALABlock}


def annealed(snf: SNF, n_stages: int, *, n_steps: int = 2, step_size: float = 0.2, kernel: str = "mc") -> SNF:
    """The SNF that anneals from ``snf``'s prior to its target pulled back through all its blocks.

    Args:
        snf: a trained SNF without stochastic blocks (a normalizing flow); its modules are shared.
        n_stages: K >= 1 stochastic blocks at λ = 1/K, 2/K, ..., 1.
        n_steps: steps per stage; step_size: their proposal width in prior units ("mc") or the
            Langevin step ε ("mala"; the noise is √(2ε), so ε = 0.02 moves about as far as 0.2).
        kernel: "mc" or "mala" (see :data:`ANNEALING_KERNELS`).
    """
    if kernel not in ANNEALING_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(ANNEALING_KERNELS)}, got {kernel!r}")
    if any(getattr(block, "stochastic", False) for block in snf.blocks):
        raise ValueError("annealing needs a flow without stochastic blocks (their pull-back is not a function); "
                         "train with model.stochastic: null")
    if n_stages < 1 or n_steps < 1 or not step_size > 0:
        raise ValueError(f"need n_stages >= 1, n_steps >= 1 and step_size > 0, got {n_stages}, {n_steps}, "
                         f"{step_size}")
    pulled_back = PulledBackEnergy(list(snf.blocks), snf.target_energy)
    periodic = snf.prior.periodic_mask
    block = ANNEALING_KERNELS[kernel]
    stages = [block(InterpolatedEnergy(snf.prior.energy, pulled_back, k / n_stages), n_steps=n_steps,
                    step_size=step_size, periodic_mask=periodic) for k in range(1, n_stages + 1)]
    refined = SNF(snf.prior, [AnnealingStages(stages)] + list(snf.blocks), snf.target_energy)
    # no config: the flow's would rebuild the flow without its stages; save the flow, anneal it when loaded
    return refined.train(snf.training)


class AnnealingStages(Block):
    """Metropolis (or MALA) blocks whose energies mix the same two terms, u_λ = (1 − λ) u_Z + λ u_F, run in
    order as one stochastic block that carries each chain's u_Z and u_F (and for MALA their gradients)
    from stage to stage.

    Run one after another, each block would evaluate u_F again at the state its predecessor ended in;
    here that value is the one computed when the state was proposed. Samples, ΔS (the sum of the
    blocks') and acceptance rates (each block's ``last_acceptance``) are those of the blocks run one
    after another: the same random numbers, the same energies (MALA's mixed gradients: the same to
    rounding). For sampling: the chains carry no gradient and step sizes do not adapt. ``inverse`` runs
    the stages in reverse order.

    Args:
        stages: :class:`MetropolisBlock` or :class:`MALABlock` instances (one kind) whose energies are
            :class:`InterpolatedEnergy` of the same prior and target terms.
    """

    stochastic = True

    def __init__(self, stages: list[MetropolisBlock]):
        super().__init__()
        energies = [stage.energy for stage in stages]
        if not stages or any(type(stage) is not type(stages[0]) for stage in stages) or any(
                not isinstance(e, InterpolatedEnergy) or e.prior_energy != energies[0].prior_energy
                or e.target_energy is not energies[0].target_energy for e in energies):
            raise ValueError("AnnealingStages needs blocks of one kind on interpolations of the same two energies")
        self.stages = nn.ModuleList(stages)
        self.prior_energy, self.target_energy = energies[0].prior_energy, energies[0].target_energy
        self.gradients = isinstance(stages[0], MALABlock)

    def forward(self, z: torch.Tensor, *, generator: torch.Generator | None = None):
        return self._run(list(self.stages), z, generator)

    def inverse(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        return self._run(list(self.stages)[::-1], x, generator)

    def _terms(self, y: torch.Tensor) -> tuple:
        """(u_Z (B,) float64, u_F (B,) float64) at y, followed by their gradients for MALA."""
        if not self.gradients:
            return self.prior_energy(y).to(torch.float64), self.target_energy(y)
        (u_prior, grad_prior), (u_target, grad_target) = (energy_and_gradient(self.prior_energy, y),
                                                          energy_and_gradient(self.target_energy, y))
        return u_prior.to(torch.float64), u_target, grad_prior, grad_target

    def _mixed(self, energy: InterpolatedEnergy, terms: tuple):
        """u_λ and the kernel state (∇u_λ for MALA, else None) from the terms."""
        return energy.mix(*terms[:2]), energy.mix(*terms[2:]) if self.gradients else None

    def _run(self, stages: list[MetropolisBlock], y: torch.Tensor, generator):
        with torch.no_grad():
            y = y.detach()
            terms = self._terms(y)
            delta_s = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
            for stage in stages:
                def evaluate(proposal, energy=stage.energy):
                    proposal_terms = self._terms(proposal)
                    return (*self._mixed(energy, proposal_terms), proposal_terms)

                u_start, state = self._mixed(stage.energy, terms)
                u, n_accepted = u_start, 0
                for _ in range(stage.n_steps):
                    y, u, state, terms, accept = stage.step(y, u, state, generator, evaluate, terms)
                    n_accepted += int(accept.sum())
                stage.last_acceptance = n_accepted / (stage.n_steps * y.shape[0])
                delta_s = delta_s + (u - u_start)
        return y, delta_s

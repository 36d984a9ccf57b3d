"""The SNF: a prior, a sequence of blocks (deterministic or stochastic) and a target energy.

For z ~ prior pushed through blocks t = 1..T to x, the log importance weight is
    log w = u_Z(z) − u_X(x) + Σ_t ΔS_t      (float64)
with ΔS_t the block's dlogp. Self-normalized averages Σ w O / Σ w are unbiased as n grows and
mean(w) estimates Z_X / Z_Z (the prior is normalized, so Z_Z = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..systems import as_mdtraj_topology
from ..weights import kish_ess, normalized_weights
from .base import Energy, FlowBlock, push_forward

__all__ = ["SNF", "SNFSample"]


@dataclass
class SNFSample:
    """Samples with their weights.

    Attributes:
        x: data-space samples, e.g. (n, n_atoms, 3) nm or (n, d).
        log_weights: (n,) float64 log importance weights (raw energies).
        target_energy: (n,) float64 reduced target energies u_X(x).
        prior_energy: (n,) float64 u_Z(z).
        acceptance: {block name: acceptance rate} of the Metropolis blocks in this pass.
    """

    x: torch.Tensor
    log_weights: torch.Tensor
    target_energy: torch.Tensor
    prior_energy: torch.Tensor
    acceptance: dict = field(default_factory=dict)

    @property
    def ess(self) -> float:
        """Kish effective sample size of the weights."""
        return kish_ess(self.log_weights)

    def to_mdtraj(self, topology):
        """``(mdtraj.Trajectory, weights)``: the samples as a trajectory (nm) and their normalized weights
        (n,) float64 summing to one, e.g. ``np.average(mdtraj.compute_phi(traj)[1][:, 0], weights=weights)``.

        Args:
            topology: a MolecularSystem, ``openmm.app.Topology`` or ``mdtraj.Topology`` of n_atoms atoms.
        """
        import mdtraj
        top = as_mdtraj_topology(topology)
        xyz = self.x.detach().cpu().double().numpy().reshape(len(self.x), -1, 3)
        if xyz.shape[1] != top.n_atoms:
            raise ValueError(f"the samples have {xyz.shape[1]} atoms, the topology {top.n_atoms}")
        return mdtraj.Trajectory(xyz, top), normalized_weights(self.log_weights)


class SNF(nn.Module):
    """Stochastic normalizing flow.

    Args:
        prior: object with ``sample(n, generator=) -> (n, D)`` and ``energy(z) -> (n,)`` (normalized
            −log density), e.g. :class:`~openmm_snf.flows.priors.Prior`.
        blocks: modules obeying the block contract (see :mod:`openmm_snf.flows.base`), applied in
            order in the sampling direction.
        target_energy: callable on the data space returning reduced energies (B,).
    """

    def __init__(self, prior, blocks: Iterable[FlowBlock], target_energy: Energy):
        super().__init__()
        self.prior = prior
        self.blocks = nn.ModuleList(list(blocks))
        self.target_energy = target_energy
        self.config: dict | None = None  # set by the builder so checkpoints can rebuild the model

    def acceptance_rates(self) -> dict:
        """{'<kind><k>': last acceptance} for the blocks that report one, named by their kind and k = 1, 2, ...
        counting blocks of that kind in sampling order (e.g. 'mc1', 'mc2'), not by position among all blocks;
        blocks run by another block (the stages of :class:`~openmm_snf.flows.anneal.AnnealingStages`) count."""
        rates, counts = {}, {}
        for module in (inner for block in self.blocks for inner in block.modules()):
            if hasattr(module, "last_acceptance"):
                counts[module.kind] = counts.get(module.kind, 0) + 1
                rates[f"{module.kind}{counts[module.kind]}"] = module.last_acceptance
        return rates

    def push(self, z: torch.Tensor, *, generator: torch.Generator | None = None):
        """Push latent z (n, D) through all blocks; return (x, Σ dlogp float64 (n,))."""
        return push_forward(self.blocks, z, generator=generator)

    def _weighted(self, n: int, generator, energy_regularizer=None):
        z = self.prior.sample(n, generator=generator)
        u_z = self.prior.energy(z).to(torch.float64)
        x, dlogp = self.push(z, generator=generator)
        u_x = self.target_energy(x).to(torch.float64)
        log_w = u_z - u_x + dlogp
        u_train = u_x if energy_regularizer is None else energy_regularizer(u_x)
        train_log_w = u_z - u_train + dlogp
        sample = SNFSample(x=x, log_weights=log_w.detach(), target_energy=u_x.detach(),
                           prior_energy=u_z.detach(), acceptance=self.acceptance_rates())
        return sample, train_log_w

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> SNFSample:
        """Draw n weighted samples (no gradients)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        with torch.no_grad():
            sample, _ = self._weighted(n, generator)
        sample.x = sample.x.detach()
        return sample

    def log_likelihood(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """log q(x) along the inverse path: −u_Z(z) + Σ dlogp_inverse, float64 (n,).

        Exact for deterministic flows; with stochastic blocks it is the paper's single-path
        estimate (its expectation bounds log q(x) from below), used for maximum likelihood.
        """
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for block in reversed(self.blocks):
            if getattr(block, "stochastic", False):
                x, dlogp = block.inverse(x, generator=generator)
            else:
                x, dlogp = block.inverse(x)
            total = total + dlogp.to(torch.float64)
        return total - self.prior.energy(x).to(torch.float64)

    def reverse_kl_loss(self, n: int, *, generator: torch.Generator | None = None,
                        energy_regularizer=None):
        """Energy-based loss −mean(log w) on n fresh samples (KL(q‖p) up to log Z_X).

        ``energy_regularizer`` maps raw target energies (n,) to the ones used in the loss (e.g. a
        log cut of high energies); the returned sample's weights always use raw energies.
        Returns (loss scalar float64, SNFSample).
        """
        sample, train_log_w = self._weighted(n, generator, energy_regularizer)
        return -train_log_w.mean(), sample

    def forward_kl_loss(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """Maximum-likelihood loss −mean(log q(x)) on data x (KL(p‖q) up to the data entropy)."""
        return -self.log_likelihood(x, generator=generator).mean()

"""The block contract shared by every flow block, deterministic or stochastic.

A block is a ``torch.nn.Module`` with

* ``forward(x) -> (y, dlogp)``: the **sampling direction** (prior/latent -> data);
* ``inverse(y) -> (x, dlogp)``: the opposite direction;

where ``dlogp`` has shape (B,). For a deterministic block it is log|det J| of the direction taken;
for a stochastic block it is the log path-probability ratio
ΔS = log q̃(input | output) − log q(output | input) of the step just taken (forward kernel q,
backward kernel q̃). Stochastic blocks set ``stochastic = True`` and accept a keyword
``generator`` (an optional ``torch.Generator`` on the tensor's device) in both directions.

:class:`FlowBlock` and :class:`Energy` state these roles as ``typing.Protocol``s for annotations:
any object with the methods qualifies (the package's blocks derive from :class:`Block`).
"""
from __future__ import annotations

import math
from typing import Iterable, Protocol

import torch
from torch import nn

__all__ = ["Block", "Energy", "FlowBlock", "InverseBlock", "wrap_angle", "push_forward"]


class Energy(Protocol):
    """Reduced energies u(y) = U/kT (B,) of a batch y (B, ...), differentiable by autograd where the
    blocks need forces (e.g. :class:`~openmm_snf.energy.OpenMMEnergy` on (B, n_atoms, 3) nm)."""

    def __call__(self, y: torch.Tensor) -> torch.Tensor: ...


class FlowBlock(Protocol):
    """The block contract: ``forward(x) -> (y, dlogp (B,))`` in the sampling direction, ``inverse(y) ->
    (x, dlogp (B,))`` back; a ``stochastic`` block also takes ``generator=`` in both directions."""

    stochastic: bool

    def __call__(self, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...


def wrap_angle(x: torch.Tensor) -> torch.Tensor:
    """Map angles (radians, any shape) into [−π, π)."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


class Block(nn.Module):
    """Base class of the package's blocks: forward/inverse with dlogp, and ``.inv``.

    Subclasses implement ``forward`` and ``inverse``; ``stochastic`` says whether they draw noise.
    """

    stochastic = False

    @property
    def inv(self) -> "InverseBlock":
        """The same block with forward and inverse swapped (shares parameters)."""
        return InverseBlock(self)


class InverseBlock(Block):
    """A block whose forward is ``block.inverse`` and whose inverse is ``block.forward``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.stochastic = bool(getattr(block, "stochastic", False))

    def forward(self, x, **kwargs):
        return self.block.inverse(x, **kwargs)

    def inverse(self, y, **kwargs):
        return self.block(y, **kwargs)

    @property
    def inv(self) -> nn.Module:
        return self.block


def push_forward(blocks: Iterable[FlowBlock], x: torch.Tensor, *, generator: torch.Generator | None = None):
    """Apply ``blocks`` in order (sampling direction); return (y, sum of dlogp in float64 (B,))."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for block in blocks:
        if getattr(block, "stochastic", False):
            x, dlogp = block(x, generator=generator)
        else:
            x, dlogp = block(x)
        total = total + dlogp.to(torch.float64)
    return x, total

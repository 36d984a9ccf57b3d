"""The energy interface shared by the batched and the sequential bridge, and its autograd Function.

An energy model maps a batch x (B, n_atoms, 3) in nm (float32/float64, CPU or CUDA tensor) to the
reduced energy u = U/kT (B,) and the forces -du/dx in kT/nm (B, n_atoms, 3). The kT conversion
happens here and nowhere else.

Bad samples never break a batch: each sample's result is its own true value (nan for non-finite
input, inf/nan/huge for overlapping or exploded atoms) and :attr:`EnergyModel.last_flags` holds a
:class:`BadSample` bit mask per sample of the latest call (0 = fine).
"""
from __future__ import annotations

import enum

import numpy as np
import torch

from ..systems import kT_in_kj_per_mol

__all__ = ["BadSample", "EnergyEvaluationError", "EnergyModel", "OpenMMEnergyFunction"]


class BadSample(enum.IntFlag):
    """Per-sample flags (bit mask) of :attr:`EnergyModel.last_flags`."""

    NONFINITE_INPUT = 1   # a coordinate is nan/inf: energy and forces are nan, OpenMM is not called
    OUT_OF_RANGE = 2      # atoms spread beyond replicated copies' radius (openmm route): evaluated alone, exactly
    NONFINITE_ENERGY = 4  # the energy is inf/nan (e.g. overlapping atoms)
    NONFINITE_FORCES = 8  # some force component is inf/nan


class EnergyEvaluationError(RuntimeError):
    """OpenMM failed on a sample; the message names the sample index."""


class OpenMMEnergyFunction(torch.autograd.Function):
    """u = model(x) with gradient -forces: backward returns grad_output * (-forces) (once differentiable)."""

    @staticmethod
    def forward(ctx, x, model):
        u, forces = model.energy_and_forces(x)
        ctx.save_for_backward(forces)
        return u

    @staticmethod
    def backward(ctx, grad_output):
        (forces,) = ctx.saved_tensors
        return -grad_output[:, None, None] * forces, None


class EnergyModel:
    """Base class: validation, unit conversion, flags. Subclasses implement ``_evaluate``.

    ``_evaluate(x, energies, device)`` gets a float64 numpy array (B, n_atoms, 3) in nm (and the
    torch device of the caller's tensor) and returns (energies (B,) kJ/mol or None, forces
    (B, n_atoms, 3) kJ/mol/nm, flags (B,) int), all new numpy arrays (the forces are scaled in place).
    """

    platform_name: str
    precision: str

    def __init__(self, mol, temperature: float | None):
        self.n_atoms = mol.n_atoms
        self.temperature = float(mol.temperature if temperature is None else temperature)
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number of kelvin, got {temperature!r}")
        self.kT = kT_in_kj_per_mol(self.temperature)
        self.last_flags = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energies u (B,) of x (B, n_atoms, 3) nm, differentiable (gradient = -forces)."""
        return OpenMMEnergyFunction.apply(x, self)

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u (B,), forces (B, n_atoms, 3) in kT/nm), same dtype and device as x; no autograd graph."""
        return self._run(x, energies=True)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        """Forces (B, n_atoms, 3) in kT/nm only (skips per-sample energies), same dtype/device as x."""
        return self._run(x, energies=False)[1]

    def _run(self, x, energies):
        self._check(x)
        positions = np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())
        with np.errstate(all="ignore"):  # overflow/invalid values are the true results of bad samples
            energy, forces, flags = self._evaluate(positions, energies, x.device)
        self.last_flags = torch.as_tensor(flags, dtype=torch.int64, device=x.device)
        forces /= self.kT  # in place: ``_evaluate`` returns arrays of its own
        f = torch.as_tensor(forces).to(device=x.device, dtype=x.dtype)
        u = None if energy is None else torch.as_tensor(energy / self.kT).to(device=x.device, dtype=x.dtype)
        return u, f

    def _check(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor of shape (B, {self.n_atoms}, 3), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3) or x.shape[0] < 1:
            raise ValueError(f"positions must have shape (B, {self.n_atoms}, 3) in nm with B >= 1, "
                             f"got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"positions must be float32 or float64, got {x.dtype}")

    def describe(self) -> str:
        """One line naming the class, platform, precision and temperature."""
        return (f"{type(self).__name__} on OpenMM {self.platform_name} ({self.precision} precision), "
                f"T = {self.temperature:g} K, kT = {self.kT:.4f} kJ/mol")

    @staticmethod
    def _output_flags(energy, forces, flags):
        """Add NONFINITE_ENERGY / NONFINITE_FORCES to ``flags`` (in place) and return it."""
        if energy is not None and not np.isfinite(energy.sum()):  # a finite sum: all finite (fast path)
            flags[~np.isfinite(energy)] |= int(BadSample.NONFINITE_ENERGY)
        if not np.isfinite(forces.sum()):
            flags[~np.isfinite(forces).all(axis=(1, 2))] |= int(BadSample.NONFINITE_FORCES)
        return flags

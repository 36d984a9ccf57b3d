"""The OpenMM side of openmm-snf: replicated Systems and batched energies/forces as torch functions.

``OpenMMEnergy(mol)(x)`` is the reduced energy u = U/kT of a batch x (B, n_atoms, 3) nm, differentiable
(gradient = -forces); ``SequentialEnergy`` is the plain loop with the same interface.
"""
from .base import BadSample, EnergyEvaluationError, EnergyModel, OpenMMEnergyFunction
from .batched import OpenMMEnergy
from .regularize import clip_forces, linlogcut
from .replicate import build_replicated_system, default_spacing, grid_offsets, max_copy_radius
from .sequential import SequentialEnergy

__all__ = ["BadSample", "EnergyEvaluationError", "EnergyModel", "OpenMMEnergy", "OpenMMEnergyFunction",
           "SequentialEnergy", "build_replicated_system", "clip_forces", "default_spacing", "grid_offsets",
           "linlogcut", "max_copy_radius"]

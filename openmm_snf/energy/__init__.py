"""The OpenMM side of openmm-snf: replicated Systems and batched energies/forces as torch functions."""
from .replicate import build_replicated_system, default_spacing, grid_offsets, max_copy_radius

__all__ = ["build_replicated_system", "default_spacing", "grid_offsets", "max_copy_radius"]

"""The energy bridge's reads from OpenMM in one place: numbers stripped of their units, and forces copied
into the caller's buffer.

Both take a private OpenMM shortcut for speed and fall back to the public API where a release lacks it:

* ``Quantity._value``: OpenMM returns quantities in its MD units (nm, ps, kJ/mol, radians, e), so the
  number inside is already the one wanted; the public ``value_in_unit_system(md_unit_system)`` converts.
* ``State._getVectorAsNumpy``: fills a float64 buffer in place, without the array allocation and the unit
  wrapping of ``State.getForces(asNumpy=True)`` that cost more than the evaluation for small molecules.
"""
from __future__ import annotations

import numpy as np
import openmm
import openmm.unit as unit

__all__ = ["md_value", "read_forces"]

_FORCE_UNIT = unit.kilojoule_per_mole / unit.nanometer


def _private_value(quantity):
    """The number inside a Quantity (KeyError if this OpenMM keeps it elsewhere)."""
    return vars(quantity)["_value"]


def _private_fill(state):
    """The State's buffer-filling call, or None if this OpenMM lacks it."""
    return getattr(state, "_getVectorAsNumpy", None)


def md_value(quantity):
    """A number, array or list OpenMM returned, in its MD units (nm, ps, kJ/mol, radians, e); anything
    that is not a Quantity is returned as it is."""
    if not unit.is_quantity(quantity):
        return quantity
    try:
        return _private_value(quantity)
    except KeyError:
        return quantity.value_in_unit_system(unit.md_unit_system)


def read_forces(state: openmm.State, out: np.ndarray) -> np.ndarray:
    """Copy the forces of ``state`` (kJ/mol/nm) into ``out`` (n_particles, 3) float64 C-contiguous; returns it."""
    if out.dtype != np.float64 or not out.flags.c_contiguous:  # the private call writes raw memory
        raise ValueError("read_forces needs a C-contiguous float64 array")
    fill = _private_fill(state)
    if fill is None:
        out[...] = np.asarray(state.getForces().value_in_unit(_FORCE_UNIT))
    else:
        fill(openmm.State.Forces, out)
    return out

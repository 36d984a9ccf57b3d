"""``openmm.unit`` quantities at the API boundary, turned into the plain numbers the package computes with.

The package's units: kelvin, femtoseconds (MD time step), 1/picosecond (friction), nanometres. A caller may
pass either a plain number (taken to be in that unit) or a Quantity in any compatible unit
(``300 * unit.kelvin``, ``0.002 * unit.picoseconds``); :func:`in_unit` makes both a float.
"""
from __future__ import annotations

import numpy as np
import openmm.unit as unit

__all__ = ["in_unit"]


def in_unit(value, target: unit.Unit, name: str):
    """``value`` in ``target`` units if it is a Quantity (a float, or a float64 array for a Quantity of a
    sequence or array); other values (numbers, arrays, None) are returned unchanged.

    Raises:
        ValueError: a Quantity whose unit is not compatible with ``target`` (e.g. a length for a temperature).
    """
    if not unit.is_quantity(value):
        return value
    if not value.unit.is_compatible(target):
        raise ValueError(f"{name} must be a number of {target.get_name()} or a Quantity compatible with it, got "
                         f"{value}")
    number = value.value_in_unit(target)
    return float(number) if np.ndim(number) == 0 else np.asarray(number, dtype=np.float64)

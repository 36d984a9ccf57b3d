"""The sequential bridge: one OpenMM Context, one ``setPositions``/``getState`` per sample.

This is what other packages do; here it is the reference path the batched bridge is tested
against and the baseline of ``benchmarks/bridge.py``. Exceptions name the sample index; non-finite
samples are not sent to OpenMM (nan results, flagged like in the batched bridge).
"""
from __future__ import annotations

import numpy as np
import openmm

from .base import BadSample, EnergyEvaluationError, EnergyModel
from .batched import reported_precision
from .openmm_access import md_value, read_forces
from .platforms import make_platform

__all__ = ["SequentialEnergy"]


class SequentialEnergy(EnergyModel):
    """Loop over the batch on one Context of the original System (same interface as OpenMMEnergy).

    Args:
        mol: the loaded system.
        platform: OpenMM platform name (default "Reference": double precision, and for a small
            molecule also the fastest loop on a CPU; "CPU" with ``threads=1`` is the other candidate).
        precision, threads: as for :class:`~openmm_snf.energy.OpenMMEnergy`.
        temperature: kelvin for kT (default: the system's).
    """

    def __init__(self, mol, *, platform: str | None = "Reference", precision: str = "mixed",
                 threads: int | None = None, temperature: float | None = None):
        super().__init__(mol, temperature)
        if mol.is_periodic:
            raise ValueError(f"{mol.name}: periodic systems are not supported by the energy bridge")
        self._platform, properties = make_platform(platform, precision=precision, threads=threads)
        self.platform_name = self._platform.getName()
        self.precision = reported_precision(self.platform_name, precision)
        self.context = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), self._platform, properties)

    def _evaluate(self, x: np.ndarray, energies: bool, device):
        flags = np.zeros(len(x), dtype=np.int64)
        energy = np.full(len(x), np.nan) if energies else None
        forces = np.full(x.shape, np.nan)
        for b, pos in enumerate(x):
            if not np.isfinite(pos).all():
                flags[b] |= BadSample.NONFINITE_INPUT
                continue
            try:
                self.context.setPositions(pos)
                state = self.context.getState(getEnergy=energies, getForces=True)
            except openmm.OpenMMException as err:
                raise EnergyEvaluationError(f"OpenMM failed on sample {b}: {err}") from err
            read_forces(state, forces[b])
            if energies:
                energy[b] = md_value(state.getPotentialEnergy())
        return energy, forces, self._output_flags(energy, forces, flags)

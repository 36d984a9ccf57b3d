"""The batched bridge: a whole batch in one OpenMM call, with exact per-sample energies.

How a batch is evaluated (see DESIGN.md, "The energy bridge"):

1. **Forces**: each sample becomes one copy of the molecule in a replicated System (``replicate.py``);
   one ``setPositions``/``getState`` returns the forces of all copies. Contexts are cached per
   copy count (powers of two up to ``chunk_size``; unused copies hold the reference structure),
   larger batches are cut into chunks. Samples are recentred on their centroid first when the
   System is translation invariant (forces and energies are unchanged by this).
2. **Per-sample energies**: OpenMM only reports the total energy of a Context, so the energy of
   each sample is recomputed from the force field parameters in vectorized torch float64
   (``terms.py``, ``gb.py``): exact, and checked against OpenMM's Reference platform force by
   force when the object is built. Forces the vectorized code does not cover (CMAP, tabulated
   functions, GBSAOBCForce with a cutoff) are evaluated exactly by a per-sample loop over a small
   Reference Context holding only those forces (slower; ``sequential_forces`` lists them).
3. **Bad samples**: non-finite samples are not sent to OpenMM (result nan); samples whose atoms
   spread further than ``copy_radius`` from their centre would no longer be isolated copies, so
   they are evaluated alone on a Reference Context of the original System (exact); all are flagged
   in ``last_flags`` (:class:`~openmm_snf.energy.base.BadSample`) and never change other samples.
4. **Tiny batches** (fewer than ``loop_below`` samples) skip the replicated Context: one call to it
   costs more than a short loop over a single-molecule Context (the faster of Reference and this
   platform on one thread, timed once).
"""
from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import openmm
import torch

from .base import BadSample, EnergyEvaluationError, EnergyModel
from .platforms import make_platform
from .replicate import build_replicated_system, check_supported, default_spacing, max_copy_radius
from .terms import build_energy_terms, to_components

__all__ = ["OpenMMEnergy", "reported_precision"]

_MAX_PAIR_ELEMENTS = 1 << 24  # bound on (batch x atom pairs) tensors of the energy terms


def reported_precision(platform_name: str, precision: str) -> str:
    """The precision a platform really uses: CPU has one fixed mode (single-precision pair forces,
    double accumulation: "mixed"), Reference is always "double", GPU platforms use the setting."""
    return {"CPU": "mixed", "Reference": "double"}.get(platform_name, precision)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run torch's CPU ops on ``n`` threads (None: unchanged), restoring the setting afterwards.

    The energy terms are small element-wise kernels; on a loaded machine torch's OpenMP threads
    compete with OpenMM's own thread pool and can run 100x slower than on one thread (measured).
    """
    previous = torch.get_num_threads()
    if n is not None and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _reference_context(system: openmm.System) -> openmm.Context:
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))


class OpenMMEnergy(EnergyModel):
    """Batched exact energies and forces of a :class:`~openmm_snf.systems.MolecularSystem`.

    Args:
        mol: the loaded system (non-periodic; supported forces: see ``replicate.SUPPORTED_FORCES``).
        platform: OpenMM platform name (None: CUDA if available, else CPU).
        precision: "mixed" (default), "double" or "single" for CUDA/OpenCL; see :func:`reported_precision`.
        threads: CPU platform threads (None: OpenMM's default, all cores).
        chunk_size: most copies in one Context; larger batches are evaluated chunk by chunk.
        per_sample_energies: False builds only the force path (``forces()``); energies then raise.
        temperature: kelvin for kT (default: the system's).
        copy_radius: nm; samples spreading further from their centre are evaluated alone (default:
            the reference structure's radius + 0.5 nm; unlimited for systems without pair forces).
        loop_below: batches with fewer (in-range) samples than this are evaluated one by one on a
            single-molecule Context instead (faster for tiny batches; default 16, 0 on Reference).
    """

    def __init__(self, mol, *, platform: str | None = None, precision: str = "mixed", threads: int | None = None,
                 chunk_size: int = 512, per_sample_energies: bool = True, temperature: float | None = None,
                 copy_radius: float | None = None, loop_below: int | None = None):
        super().__init__(mol, temperature)
        check_supported(mol.system)
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.system = mol.system
        self.chunk_size = int(chunk_size)
        self._platform, self._properties = make_platform(platform, precision=precision, threads=threads)
        self.platform_name = self._platform.getName()
        self.precision = reported_precision(self.platform_name, precision)
        self.loop_below = (0 if self.platform_name == "Reference" else 16) if loop_below is None else int(loop_below)
        names = {type(f).__name__ for f in mol.system.getForces()}
        self.recenter = "CustomExternalForce" not in names
        reference = self._centered(mol.positions[None])[0]
        if copy_radius is None:
            copy_radius = float(np.linalg.norm(reference, axis=1).max()) + 0.5
        self.spacing = default_spacing(mol.system, copy_radius)
        bound = max_copy_radius(mol.system, self.spacing)  # inf without pair forces: copies never interact
        self.copy_radius = bound if np.isinf(bound) else min(float(copy_radius), bound)
        self._reference = reference
        self._contexts = {}
        self._alone = None
        self._loop = None
        self.terms, self.sequential_forces = [], []
        self.per_sample_energies = bool(per_sample_energies)
        if self.per_sample_energies:
            self.terms, indices = build_energy_terms(mol.system)
            self.sequential_forces = [type(mol.system.getForce(i)).__name__ for i in indices]
            self._self_check(mol.positions)

    def _centered(self, x: np.ndarray) -> np.ndarray:
        return x - x.mean(axis=1, keepdims=True) if self.recenter else x

    def _context(self, n_copies: int):
        """(Context, offsets, template positions) for ``n_copies`` copies, cached."""
        if n_copies not in self._contexts:
            system, offsets = build_replicated_system(self.system, n_copies, spacing=self.spacing)
            context = openmm.Context(system, openmm.VerletIntegrator(0.001), self._platform, dict(self._properties))
            template = self._reference[None] + offsets[:, None, :]
            self._contexts[n_copies] = (context, offsets, template)
        return self._contexts[n_copies]

    def _bucket(self, n: int) -> int:
        size = 1
        while size < n:
            size *= 2
        return min(size, self.chunk_size)

    def _batched_forces(self, centered: np.ndarray) -> np.ndarray:
        """Forces (k, n_atoms, 3) kJ/mol/nm of in-range, centred samples via replicated Contexts."""
        out = np.empty_like(centered)
        for start in range(0, len(centered), self.chunk_size):
            chunk = centered[start:start + self.chunk_size]
            context, offsets, template = self._context(self._bucket(len(chunk)))
            positions = template.copy()
            positions[:len(chunk)] = chunk + offsets[:len(chunk), None, :]
            context.setPositions(positions.reshape(-1, 3))
            forces = context.getState(getForces=True).getForces(asNumpy=True)._value
            out[start:start + len(chunk)] = forces.reshape(len(positions), self.n_atoms, 3)[:len(chunk)]
        return out

    def _loop_context(self) -> openmm.Context:
        """The faster single-molecule Context for tiny batches: Reference, or this platform on one thread.

        Timed once on the reference structure (for alanine dipeptide in vacuum Reference wins; with a
        CustomGBForce, whose Reference kernel is interpreted, the CPU platform does).
        """
        if self._loop is None:
            candidates = [self._reference_alone()]
            if self.platform_name != "Reference":
                properties = dict(self._properties, **({"Threads": "1"} if self.platform_name == "CPU" else {}))
                candidates.append(openmm.Context(self.system, openmm.VerletIntegrator(0.001), self._platform,
                                                 properties))
            self._loop = min(candidates, key=self._time_context)
        return self._loop

    def _time_context(self, context: openmm.Context, repeats: int = 8) -> float:
        context.setPositions(self._reference)
        context.getState(getEnergy=True, getForces=True)
        start = time.perf_counter()
        for _ in range(repeats):
            context.setPositions(self._reference)
            context.getState(getEnergy=True, getForces=True)
        return time.perf_counter() - start

    def _reference_alone(self) -> openmm.Context:
        if self._alone is None:
            self._alone = _reference_context(self.system)
        return self._alone

    def _evaluate_alone(self, x: np.ndarray, index: int, energies: bool, context: openmm.Context | None = None):
        """Energy (kJ/mol) and forces of one sample on a single-molecule Context (default: Reference)."""
        context = context or self._reference_alone()
        try:
            context.setPositions(x)
            state = context.getState(getEnergy=energies, getForces=True)
        except Exception as err:  # OpenMM raises plain Exceptions
            raise EnergyEvaluationError(f"OpenMM failed on sample {index}: {err}") from err
        energy = state.getPotentialEnergy()._value if energies else None
        return energy, state.getForces(asNumpy=True)._value

    def _energies(self, x: np.ndarray, device) -> np.ndarray:
        """Per-sample energies (k,) kJ/mol from the vectorized terms."""
        if not self.per_sample_energies:
            raise RuntimeError("this OpenMMEnergy was built with per_sample_energies=False; only forces() works")
        step = max(1, _MAX_PAIR_ELEMENTS // max(1, self.n_atoms * self.n_atoms))
        out = []
        with _torch_threads(1 if torch.device(device).type == "cpu" else None):
            for start in range(0, len(x), step):
                c = to_components(torch.as_tensor(x[start:start + step], device=device))
                total = torch.zeros(c.shape[2], dtype=torch.float64, device=device)
                for _, term in self.terms:
                    total = total + term(c)
                out.append(total.cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _evaluate(self, x: np.ndarray, energies: bool, device):
        batch = len(x)
        flags = np.zeros(batch, dtype=np.int64)
        energy = np.full(batch, np.nan) if energies else None
        forces = np.full_like(x, np.nan)
        finite = np.isfinite(x).all(axis=(1, 2))
        flags[~finite] |= BadSample.NONFINITE_INPUT
        centered = np.zeros_like(x)
        centered[finite] = self._centered(x[finite])
        radius = np.full(batch, np.inf)
        radius[finite] = np.linalg.norm(centered[finite], axis=-1).max(axis=-1)
        inside = finite & (radius < self.copy_radius)
        outside = np.flatnonzero(finite & ~inside)
        flags[outside] |= BadSample.OUT_OF_RANGE
        if 0 < inside.sum() < self.loop_below:  # a few samples: a plain loop beats one replicated call
            for b in np.flatnonzero(inside):
                e, forces[b] = self._evaluate_alone(x[b], int(b), energies, self._loop_context())
                if energies:
                    energy[b] = e
            inside = np.zeros_like(inside)
        if inside.any():
            try:
                forces[inside] = self._batched_forces(centered[inside])
            except Exception as err:  # OpenMM raises plain Exceptions; find the failing sample on its own
                warnings.warn(f"the replicated Context failed ({err}); evaluating this batch sample by sample")
                outside, inside = np.flatnonzero(finite), np.zeros_like(inside)
        if inside.any() and energies:
            energy[inside] = self._energies(x[inside], device)
        for b in outside:
            e, forces[b] = self._evaluate_alone(x[b], int(b), energies)
            if energies:
                energy[b] = e
        return energy, forces, self._output_flags(energy, forces, flags)

    def _self_check(self, positions: np.ndarray, tolerance: float = 1e-4) -> None:
        """Compare every vectorized term with OpenMM's Reference platform, force by force.

        Raises RuntimeError naming the force if a term differs by more than ``tolerance`` kJ/mol
        (+1e-9 relative) on the reference structure or two perturbed copies of it.
        """
        system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(self.system))
        if system.getNumForces() > 32:
            return  # force groups cannot separate more than 32 forces; the tests cover such systems
        for i, force in enumerate(system.getForces()):
            force.setForceGroup(i)
        context = _reference_context(system)
        rng = np.random.default_rng(0)
        xs = positions[None] + np.array([0.0, 0.01, 0.02])[:, None, None] * rng.standard_normal((3, *positions.shape))
        seq = set(range(system.getNumForces())) - {i for i, _ in self.terms if i >= 0}
        mine = {i: term(to_components(torch.as_tensor(xs))).numpy() for i, term in self.terms}
        for b, pos in enumerate(xs):
            context.setPositions(pos)
            for i, _ in self.terms:
                groups = {i} if i >= 0 else seq
                ref = context.getState(getEnergy=True, groups=groups).getPotentialEnergy()._value
                if abs(mine[i][b] - ref) > tolerance + 1e-9 * abs(ref):
                    name = type(system.getForce(i)).__name__ if i >= 0 else "sequential forces"
                    raise RuntimeError(f"per-sample energy of force {i} ({name}) differs from OpenMM's by "
                                       f"{mine[i][b] - ref:.3g} kJ/mol; this force's settings are not supported")

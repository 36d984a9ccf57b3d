"""The batched bridge: a whole batch in one call, with exact per-sample energies and forces.

Three exact routes compute the forces of a batch (``forces_from``; "auto" picks compiled on the CPU
and Reference platforms, openmm on GPU platforms; the platform itself, when not named, is the first
usable of CUDA, OpenCL on a GPU, CPU and Reference, see ``platforms.py``):

* **compiled** (``kernels.py``): harmonic bonds and angles, periodic torsions, NonbondedForce and the
  generalized-Born models of ``openmm.app`` (HCT, OBC1, OBC2, GBn, GBn2; native GBSAOBCForce) in one
  numba-compiled float64 function over blocks of samples, parallel over the batch; energies come
  with the forces at no extra cost (measured on a 2-core CPU: 10-15x the best one-sample-at-a-time
  OpenMM loop for alanine dipeptide, see README). Forces the kernel does not cover (custom forces, RB
  torsions, GB forces of other forms) come from the torch terms.
* **torch**: the vectorized float64 terms of ``terms.py``/``gb.py`` compute energies and forces of
  all samples at once, with analytic gradients for bonds, angles, periodic torsions and
  NonbondedForce and autograd for the others (GB models, custom forces, RB torsions); on a GPU they
  run on the tensors' device.
* **openmm**: each sample becomes one copy of the molecule in a replicated System
  (``replicate.py``); one ``setPositions``/``getState`` returns the forces of all copies. Contexts are
  cached per copy count (powers of two up to ``chunk_size``; unused copies hold the reference
  structure), larger batches are cut into chunks. Samples are recentred on their centroid first
  when the System is translation invariant (forces and energies are unchanged by this). The fast
  route on GPUs.

On the compiled and torch routes, forces without a vectorized term (CMAP, continuous tabulated
functions, GBSAOBCForce with a cutoff) still come from OpenMM, through a replicated Context that
holds only those forces.

**Per-sample energies** (OpenMM only reports the total energy of a Context) come from the compiled
kernel plus the torch terms on the CPU and Reference platforms (on the openmm route too), from the
torch terms alone on the torch route and on GPU platforms; forces without a vectorized term get their
energies from a per-sample loop over a small Reference Context holding only those forces
(``sequential_forces`` lists them).
Every term is checked against OpenMM's Reference platform when the object is built: the compiled
kernel (energies and forces) over the force groups it claims, every other term force group by force
group (energies, and forces on the torch route).

**Bad samples**: non-finite samples are not evaluated (result nan); on routes with replicated
Contexts, samples whose atoms spread further than ``copy_radius`` from their centre would no longer
be isolated copies, so they are evaluated alone on a Reference Context of the original System
(exact); all are flagged in ``last_flags`` (:class:`~openmm_snf.energy.base.BadSample`) and never
change other samples.

**Tiny batches** (fewer than ``loop_below`` samples) are evaluated by a short loop over a
single-molecule Context (the faster of Reference and this platform on one thread, timed once):
one batched call has a fixed cost of about a millisecond.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import openmm
import torch

from .base import BadSample, EnergyEvaluationError, EnergyModel
from . import platforms
from .platforms import choose_platform, platform_properties
from .replicate import build_replicated_system, check_supported, default_spacing, max_copy_radius
from .kernels import CompiledTerms
from .openmm_access import md_value, read_forces
from .terms import build_energy_terms, evaluate_term, subsystem, to_components

__all__ = ["OpenMMEnergy", "reported_precision"]

_MAX_PAIR_ELEMENTS = 1 << 24  # bound on (batch x atom pairs) tensors of the energy terms
_TORCH_CHUNK = 512  # samples per pass of the torch terms: larger passes leave the CPU caches
_ROUTES = ("auto", "compiled", "torch", "openmm")


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
        platform: OpenMM platform name, or None/"auto": the first of CUDA, OpenCL on a GPU, CPU,
            Reference (``platforms.auto_candidates``) whose route builds, passes its self-check and
            matches the Reference platform on batches of 1 and 3 samples; :attr:`platform_choice` says why.
        precision: "mixed" (default), "double" or "single" for CUDA/OpenCL; see :func:`reported_precision`.
        threads: CPU platform and compiled-kernel threads (None: all cores).
        chunk_size: most copies in one replicated Context; larger batches are evaluated chunk by chunk.
        per_sample_energies: False skips building the sequential energy fallback; energies then raise.
        temperature: kelvin for kT (default: the system's).
        copy_radius: nm; samples spreading further from their centre are evaluated alone (default:
            the reference structure's radius + 0.5 nm; unlimited for systems without pair forces).
        loop_below: batches with fewer (in-range) samples than this are evaluated one by one on a
            single-molecule Context instead (faster for tiny batches; default 16 on the openmm route
            of the CPU and GPU platforms, else 0).
        forces_from: "compiled" (numba kernel, torch terms for the forces it does not cover), "torch"
            (vectorized float64 terms), "openmm" (replicated Contexts for all forces) or "auto"
            (compiled on CPU and Reference, openmm on GPUs); the route taken is :attr:`forces_from`.
    """

    def __init__(self, mol, *, platform: str | None = None, precision: str = "mixed", threads: int | None = None,
                 chunk_size: int = 512, per_sample_energies: bool = True, temperature: float | None = None,
                 copy_radius: float | None = None, loop_below: int | None = None, forces_from: str = "auto"):
        super().__init__(mol, temperature)
        check_supported(mol.system)
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if forces_from not in _ROUTES:
            raise ValueError(f"forces_from must be one of {', '.join(_ROUTES)}, got {forces_from!r}")
        self.system = mol.system
        self.chunk_size = int(chunk_size)
        self.per_sample_energies = bool(per_sample_energies)
        auto = platform is None or str(platform).lower() == "auto"
        choices = platforms.auto_candidates() if auto else [choose_platform(platform)]
        if auto:
            choices = [c for c in choices if platforms.usable(c)] or choices[-1:]
        for k, choice in enumerate(choices):
            try:
                self._setup(mol, choice, precision, threads, forces_from, loop_below, copy_radius)
                if auto:
                    self._probe()
                break
            except Exception as err:  # OpenMM raises plain Exceptions; any failure: the next route
                if not auto or k == len(choices) - 1:
                    raise
                warnings.warn(f"OpenMM platform {choice.name} not chosen: {err}")
        self.platform_choice = f"auto: {choice.reason}" if auto else None

    def _setup(self, mol, choice, precision, threads, forces_from, loop_below, copy_radius) -> None:
        """Build everything that depends on the platform (Contexts are made lazily) and self-check it."""
        self._platform, self._properties = platform_properties(choice, precision=precision, threads=threads)
        self.platform_name = self._platform.getName()
        self.precision = reported_precision(self.platform_name, precision)
        names = {type(f).__name__ for f in mol.system.getForces()}
        if forces_from == "auto":
            forces_from = "compiled" if self.platform_name in ("CPU", "Reference") else "openmm"
        self.forces_from = forces_from
        if loop_below is None:
            loop_below = 16 if forces_from == "openmm" and self.platform_name != "Reference" else 0
        self.loop_below = int(loop_below)
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
        self.terms, self.sequential_forces, self.compiled = [], [], None
        sequential = []
        if self.per_sample_energies or forces_from != "openmm":
            self.terms, sequential = build_energy_terms(mol.system, sequential_energies=self.per_sample_energies)
            self.sequential_forces = [type(mol.system.getForce(i)).__name__ for i in sequential]
            # the kernel serves the compiled route, and per-sample energies on CPUs beside OpenMM's forces
            if forces_from == "compiled" or (forces_from == "openmm" and self.platform_name in ("CPU", "Reference")):
                self.compiled = CompiledTerms(self.terms, threads=threads)
            self._self_check(mol.positions)
        # the forces the replicated Contexts compute: those the terms do not cover, or all of them
        torch_rest = subsystem(mol.system, sequential)
        rest = torch_rest if torch_rest.getNumForces() else None
        self._replicated = {"torch": rest, "compiled": rest, "openmm": mol.system}

    def _probe(self, tolerance: float = 1e-3) -> None:
        """Batches of 1, 3 and ``max(loop_below, 4)`` samples (the tiny-batch loop and the batched
        path) on the chosen route must match the Reference platform.

        Raises RuntimeError when a force differs by more than ``tolerance`` times the largest force
        component (mixed precision is ~1e-5), an energy by more than 1e-2 kJ/mol + 1e-6 relative, or
        a result is not finite.
        """
        rng = np.random.default_rng(1)
        x = self._reference[None] + 0.01 * rng.standard_normal((max(self.loop_below, 4), self.n_atoms, 3))
        for batch in (x[:1], x[:3], x):
            energy, forces, _ = self._evaluate(batch, self.per_sample_energies, "cpu")
            for b, sample in enumerate(batch):
                ref_forces = np.empty(sample.shape)
                ref = self._evaluate_alone(sample, b, self.per_sample_energies, ref_forces)
                bound = tolerance * max(np.abs(ref_forces).max(), 1.0)
                bad_energy = energy is not None and not abs(energy[b] - ref) <= 1e-2 + 1e-6 * abs(ref)
                if bad_energy or not np.all(np.abs(forces[b] - ref_forces) <= bound):
                    raise RuntimeError(f"a batch of {len(batch)} on OpenMM {self.platform_name} differs from the "
                                       "Reference platform")

    def describe(self) -> str:
        """One line naming the platform (and why, when chosen automatically), precision, temperature and
        where the forces come from."""
        choice = f" [{self.platform_choice}]" if self.platform_choice else ""
        if self.forces_from == "openmm":
            return f"{super().describe()}{choice}; forces from replicated OpenMM {self.platform_name} Contexts"
        parts = []
        if self.compiled is not None and self.compiled.indices:
            parts.append("the compiled float64 kernel")
        if not parts or self.compiled.rest:
            parts.append("float64 torch terms")
        if self.sequential_forces:
            parts.append(f"OpenMM {self.platform_name} ({', '.join(self.sequential_forces)})")
        return f"{super().describe()}{choice}; forces from {' and '.join(parts)}"

    def _centered(self, x: np.ndarray) -> np.ndarray:
        return x - x.mean(axis=1, keepdims=True) if self.recenter else x

    def _context(self, route: str, n_copies: int):
        """(Context, offsets, template positions) for ``n_copies`` copies of ``route``'s forces, cached."""
        if (route, n_copies) not in self._contexts:
            system, offsets = build_replicated_system(self._replicated[route], n_copies, spacing=self.spacing)
            context = openmm.Context(system, openmm.VerletIntegrator(0.001), self._platform, dict(self._properties))
            template = self._reference[None] + offsets[:, None, :]
            self._contexts[route, n_copies] = (context, offsets, template)
        return self._contexts[route, n_copies]

    def _bucket(self, n: int) -> int:
        size = 1
        while size < n:
            size *= 2
        return min(size, self.chunk_size)

    def _batched_forces(self, route: str, centered: np.ndarray) -> np.ndarray:
        """Forces (k, n_atoms, 3) kJ/mol/nm of the replicated Context's forces for in-range, centred samples."""
        out = np.empty(centered.shape)
        for start in range(0, len(centered), self.chunk_size):
            chunk = centered[start:start + self.chunk_size]
            context, offsets, template = self._context(route, self._bucket(len(chunk)))
            positions = template.copy()
            positions[:len(chunk)] = chunk + offsets[:len(chunk), None, :]
            context.setPositions(positions.reshape(-1, 3))
            if len(chunk) == len(positions):  # a full Context: OpenMM writes straight into the result
                read_forces(context.getState(getForces=True), out[start:start + len(chunk)].reshape(-1, 3))
            else:
                forces = read_forces(context.getState(getForces=True), np.empty((len(positions) * self.n_atoms, 3)))
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

    def _evaluate_alone(self, x: np.ndarray, index: int, energies: bool, forces: np.ndarray,
                        context: openmm.Context | None = None) -> float | None:
        """Energy (kJ/mol) of one sample on a single-molecule Context (default: Reference); its forces
        go into ``forces`` (n_atoms, 3)."""
        context = context or self._reference_alone()
        try:
            context.setPositions(x)
            state = context.getState(getEnergy=energies, getForces=True)
        except openmm.OpenMMException as err:
            raise EnergyEvaluationError(f"OpenMM failed on sample {index}: {err}") from err
        read_forces(state, forces)
        return md_value(state.getPotentialEnergy()) if energies else None

    def _vectorized(self, x: np.ndarray, energies: bool, forces: bool, device, compiled: bool):
        """(energies (k,) kJ/mol or None, forces (k, n_atoms, 3) kJ/mol/nm of the terms or None).

        ``compiled``: the compiled kernel evaluates the forces it covers, the torch terms the rest.
        The forces leave out the sequential forces (the replicated Context adds them).
        """
        terms = self.compiled.rest if compiled else self.terms
        if compiled:
            energy, force = self.compiled(x)
            energy, force = (energy if energies else None), (force if forces else None)
            if not terms or not (energies or any(index >= 0 for index, _ in terms)):
                return energy, force
        else:
            energy = np.zeros(len(x)) if energies else None
            force = np.zeros(x.shape) if forces else None
        step = max(1, min(_TORCH_CHUNK, _MAX_PAIR_ELEMENTS // max(1, self.n_atoms * self.n_atoms)))
        with _torch_threads(1 if torch.device(device).type == "cpu" else None):
            for start in range(0, len(x), step):
                c = to_components(torch.as_tensor(x[start:start + step], device=device))
                grad = torch.zeros_like(c) if forces else None
                total = torch.zeros(c.shape[2], dtype=torch.float64, device=device)
                for index, term in terms:
                    if index >= 0:
                        total = total + evaluate_term(term, c, grad)
                    elif energies:  # the sequential term: energies only
                        total = total + term(c)
                if energies:
                    energy[start:start + step] += total.cpu().numpy()
                if forces:
                    force[start:start + step] -= grad.permute(2, 1, 0).cpu().numpy()
        return energy, force

    def _in_batch(self, x: np.ndarray, centered: np.ndarray, energies: bool, device):
        """(energies or None, forces) of in-range samples, by the chosen route."""
        route = self.forces_from
        energy, forces = (None, None)
        if energies or route != "openmm":
            energy, forces = self._vectorized(x, energies, route != "openmm", device, self.compiled is not None)
        if self._replicated[route] is not None:
            openmm_forces = self._batched_forces(route, centered)
            forces = openmm_forces if forces is None else forces + openmm_forces
        return energy, forces

    def _evaluate(self, x: np.ndarray, energies: bool, device):
        batch = len(x)
        if energies and not self.per_sample_energies:
            raise RuntimeError("this OpenMMEnergy was built with per_sample_energies=False; only forces() works")
        flags = np.zeros(batch, dtype=np.int64)
        # a finite sum means every coordinate is finite (inf and nan propagate): the cheap common case
        finite = np.ones(batch, dtype=bool) if np.isfinite(x.sum()) else np.isfinite(x).all(axis=(1, 2))
        if self._replicated[self.forces_from] is None:  # no copies in a Context: no range to respect
            centered, inside = x, finite
        else:
            centered = self._centered(x if finite.all() else np.where(finite[:, None, None], x, 0.0))
            radius_sq = np.einsum("bai,bai->ba", centered, centered).max(axis=1)
            inside = finite & (radius_sq < self.copy_radius ** 2)
        outside = np.flatnonzero(finite & ~inside)
        if not inside.all():
            flags[~finite] |= int(BadSample.NONFINITE_INPUT)
            flags[outside] |= int(BadSample.OUT_OF_RANGE)
        if inside.all() and batch >= self.loop_below:  # the common case: no copies of the batch
            try:
                energy, forces = self._in_batch(x, centered, energies, device)
                return energy, forces, self._output_flags(energy, forces, flags)
            except openmm.OpenMMException as err:  # find the failing sample on its own (a bug in ours is raised)
                warnings.warn(f"the batched evaluation failed ({err}); evaluating this batch sample by sample")
                inside, outside = np.zeros_like(inside), np.arange(batch)
        energy = np.full(batch, np.nan) if energies else None
        forces = np.full(x.shape, np.nan)
        if 0 < inside.sum() < self.loop_below:  # a few samples: a plain loop beats one batched call
            for b in np.flatnonzero(inside):
                e = self._evaluate_alone(x[b], int(b), energies, forces[b], self._loop_context())
                if energies:
                    energy[b] = e
            inside = np.zeros_like(inside)
        if inside.any():
            try:
                e, forces[inside] = self._in_batch(x[inside], centered[inside], energies, device)
                if energies:
                    energy[inside] = e
            except openmm.OpenMMException as err:  # as above
                warnings.warn(f"the batched evaluation failed ({err}); evaluating this batch sample by sample")
                outside = np.flatnonzero(finite)
        for b in outside:
            e = self._evaluate_alone(x[b], int(b), energies, forces[b])
            if energies:
                energy[b] = e
        return energy, forces, self._output_flags(energy, forces, flags)

    def _self_check(self, positions: np.ndarray, tolerance: float = 1e-4) -> None:
        """Compare every vectorized term with OpenMM's Reference platform, force group by force group.

        Raises RuntimeError naming the force if a term's energy differs by more than ``tolerance``
        kJ/mol (+1e-9 relative), or (torch route) its forces by more than ``tolerance`` times the
        largest force component, on the reference structure or two perturbed copies of it.
        """
        system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(self.system))
        if system.getNumForces() > 32:
            return  # force groups cannot separate more than 32 forces; the tests cover such systems
        for i, force in enumerate(system.getForces()):
            force.setForceGroup(i)
        context = _reference_context(system)
        rng = np.random.default_rng(0)
        xs = positions[None] + np.array([0.0, 0.01, 0.02])[:, None, None] * rng.standard_normal((3, *positions.shape))
        c = to_components(torch.as_tensor(xs))
        seq = set(range(system.getNumForces())) - {i for i, _ in self.terms if i >= 0}
        checks = []  # (name, force groups, energies (3,), forces (3, n_atoms, 3) or None)
        claimed = set(self.compiled.indices) if self.compiled is not None else set()
        for i, term in self.terms:
            if i in claimed:  # checked below as part of the compiled kernel, which replaces it
                continue
            grad = torch.zeros_like(c) if i >= 0 and self.forces_from == "torch" else None
            energy = evaluate_term(term, c, grad).numpy()
            name = f"force {i} ({type(system.getForce(i)).__name__})" if i >= 0 else "the sequential forces"
            checks.append((name, {i} if i >= 0 else seq, energy,
                           None if grad is None else -grad.permute(2, 1, 0).numpy()))
        if claimed:
            names = ", ".join(type(system.getForce(i)).__name__ for i in self.compiled.indices)
            checks.append((f"the compiled kernel ({names})", set(self.compiled.indices), *self.compiled(xs)))
        for b, pos in enumerate(xs):
            context.setPositions(pos)
            for name, groups, energy, force in checks:
                state = context.getState(getEnergy=True, getForces=force is not None, groups=groups)
                ref = md_value(state.getPotentialEnergy())
                if abs(energy[b] - ref) > tolerance + 1e-9 * abs(ref):
                    raise RuntimeError(f"per-sample energy of {name} differs from OpenMM's by "
                                       f"{energy[b] - ref:.3g} kJ/mol; this force's settings are not supported")
                if force is not None:
                    ref_forces = md_value(state.getForces(asNumpy=True))
                    error = np.abs(force[b] - ref_forces).max()
                    if error > tolerance * max(np.abs(ref_forces).max(), 1.0):
                        raise RuntimeError(f"forces of {name} differ from OpenMM's by {error:.3g} "
                                           "kJ/mol/nm; this force's settings are not supported")

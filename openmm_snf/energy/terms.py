"""Exact per-sample energies of OpenMM forces, vectorized over a batch in torch (float64).

OpenMM reports only the total energy of a Context; the replicated System (see ``replicate.py``)
therefore gives exact forces for a batch but not the energy of each copy. Each class here evaluates
one force's energy for a whole batch from the force's own parameters, with the formulas OpenMM uses
(in double precision, like OpenMM's Reference platform). :func:`build_energy_terms` turns a System
into such terms; forces without a vectorized form here go to :class:`SequentialTerm`, which
evaluates just those forces one sample at a time on a small OpenMM Context (exact, slower).

Every term maps coordinates ``c`` in component-major layout (3, n_atoms, B) float64 nm (see
:func:`to_components`; contiguous rows over the batch keep the arithmetic vectorized) to energies
(B,) float64 kJ/mol.
"""
from __future__ import annotations

import math

import numpy as np
import openmm
import torch

from .expression import ExpressionError, parse
from .gb import CustomGBTerm, GBSAOBCTerm, tabulated_functions

__all__ = ["ONE_4PI_EPS0", "build_energy_terms", "SequentialTerm", "to_components", "distance", "bond_angle",
           "dihedral"]

ONE_4PI_EPS0 = 138.93545764438198  # kJ/mol nm / e^2, OpenMM's value


def _value(quantity) -> float:
    """Strip OpenMM units (OpenMM's default units: nm, kJ/mol, radians, e)."""
    return quantity._value if hasattr(quantity, "_value") else float(quantity)


def _tensor(values, dtype=torch.float64):
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def to_components(x: torch.Tensor) -> torch.Tensor:
    """(B, n_atoms, 3) positions -> contiguous (3, n_atoms, B) float64 coordinates."""
    return x.to(torch.float64).permute(2, 1, 0).contiguous()


def _cross(a, b):
    return torch.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def distance(c, i, j):
    """|r_j - r_i| for index tensors i, j (m,): (m, B)."""
    d = c[:, j] - c[:, i]
    return torch.sqrt((d * d).sum(0))


def bond_angle(c, i, j, k):
    """Angle (rad) at j between j->i and j->k, (m, B); atan2 keeps it accurate near 0 and pi."""
    a, b = c[:, i] - c[:, j], c[:, k] - c[:, j]
    n = _cross(a, b)
    return torch.atan2(torch.sqrt((n * n).sum(0)), (a * b).sum(0))


def dihedral(c, i, j, k, l):
    """Dihedral angle (rad, in [-pi, pi]) of i-j-k-l with OpenMM's sign convention, (m, B).

    OpenMM's sign is opposite to the IUPAC/mdtraj one; it matters for phases other than 0 and pi.
    """
    b1, b2, b3 = c[:, j] - c[:, i], c[:, k] - c[:, j], c[:, l] - c[:, k]
    n1, n2 = _cross(b1, b2), _cross(b2, b3)
    m1 = _cross(n1, b2 / torch.sqrt((b2 * b2).sum(0)))
    return torch.atan2(-(m1 * n2).sum(0), (n1 * n2).sum(0))


class _IndexedTerm:
    """Common storage: atom index columns and per-term parameters (shape (m, ..., 1), broadcasting
    against the batch axis), moved to the batch's device lazily."""

    def __init__(self, atoms, params):
        atoms = np.asarray(atoms, dtype=np.int64)
        self._cpu = [_tensor(a, torch.long) for a in (atoms[:, None] if atoms.ndim == 1 else atoms).T]
        self._params = {k: _tensor(v).unsqueeze(-1) for k, v in params.items()}
        self._device = None

    def _on(self, device):
        if self._device != device:
            self._cpu = [a.to(device) for a in self._cpu]
            self._params = {k: v.to(device) for k, v in self._params.items()}
            self._device = device
        return self._cpu, self._params


class HarmonicBondTerm(_IndexedTerm):
    def __init__(self, force):
        terms = [force.getBondParameters(t) for t in range(force.getNumBonds())]
        super().__init__([t[:2] for t in terms] or np.zeros((0, 2)),
                         {"r0": [_value(t[2]) for t in terms], "k": [_value(t[3]) for t in terms]})

    def __call__(self, c):
        (i, j), p = self._on(c.device)
        stretch = distance(c, i, j) - p["r0"]
        return (0.5 * p["k"] * stretch * stretch).sum(0)


class HarmonicAngleTerm(_IndexedTerm):
    def __init__(self, force):
        terms = [force.getAngleParameters(t) for t in range(force.getNumAngles())]
        super().__init__([t[:3] for t in terms] or np.zeros((0, 3)),
                         {"theta0": [_value(t[3]) for t in terms], "k": [_value(t[4]) for t in terms]})

    def __call__(self, c):
        (i, j, k), p = self._on(c.device)
        bend = bond_angle(c, i, j, k) - p["theta0"]
        return (0.5 * p["k"] * bend * bend).sum(0)


class PeriodicTorsionTerm(_IndexedTerm):
    """Force fields put several periodicities on one dihedral: each distinct dihedral is computed once."""

    def __init__(self, force):
        terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        quads = np.array([t[:4] for t in terms], dtype=np.int64).reshape(-1, 4)
        unique, which = np.unique(quads, axis=0, return_inverse=True)
        super().__init__(unique, {"n": [t[4] for t in terms], "phase": [_value(t[5]) for t in terms],
                                  "k": [_value(t[6]) for t in terms]})
        self._which = torch.as_tensor(which.reshape(-1), dtype=torch.long)

    def __call__(self, c):
        (i, j, k, l), p = self._on(c.device)
        self._which = self._which.to(c.device)
        phi = dihedral(c, i, j, k, l)[self._which]
        return (p["k"] * (1.0 + torch.cos(p["n"] * phi - p["phase"]))).sum(0)


class RBTorsionTerm(_IndexedTerm):
    def __init__(self, force):
        terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        super().__init__([t[:4] for t in terms] or np.zeros((0, 4)),
                         {"c": [[_value(c) for c in t[4:10]] for t in terms] or np.zeros((0, 6))})

    def __call__(self, c):
        (i, j, k, l), p = self._on(c.device)
        cos_psi = torch.cos(dihedral(c, i, j, k, l) - math.pi)
        powers = cos_psi.unsqueeze(1) ** torch.arange(6, device=c.device, dtype=c.dtype).unsqueeze(-1)
        return (p["c"] * powers).sum((0, 1))


class NonbondedTerm(_IndexedTerm):
    """NonbondedForce with NoCutoff or CutoffNonPeriodic (reaction field, optional LJ switching).

    Non-exception pairs use Lorentz-Berthelot combining; exceptions (14 pairs, exclusions) use their
    own parameters, are never cut off and get plain Coulomb, as in OpenMM.
    """

    def __init__(self, force):
        n = force.getNumParticles()
        q, sig, eps = (np.array(v) for v in zip(*[[_value(a) for a in force.getParticleParameters(i)]
                                                   for i in range(n)]))
        exceptions = [force.getExceptionParameters(e) for e in range(force.getNumExceptions())]
        excluded = {(min(e[0], e[1]), max(e[0], e[1])) for e in exceptions}
        pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in excluded],
                         dtype=np.int64).reshape(-1, 2)
        kept = [e for e in exceptions if _value(e[2]) != 0 or _value(e[4]) != 0]
        params = {"qq": q[pairs[:, 0]] * q[pairs[:, 1]], "sigma": 0.5 * (sig[pairs[:, 0]] + sig[pairs[:, 1]]),
                  "eps": np.sqrt(eps[pairs[:, 0]] * eps[pairs[:, 1]])}
        exception_pairs = np.array([e[:2] for e in kept], dtype=np.int64).reshape(-1, 2)
        exception_params = {"qq": [_value(e[2]) for e in kept], "sigma": [_value(e[3]) for e in kept],
                            "eps": [_value(e[4]) for e in kept]}
        self.cutoff = None if force.getNonbondedMethod() == 0 else _value(force.getCutoffDistance())
        if self.cutoff is None:  # same formula for both: one pass over all pairs
            pairs = np.concatenate([pairs, exception_pairs])
            params = {k: np.concatenate([v, exception_params[k]]) for k, v in params.items()}
            exception_pairs, exception_params = np.zeros((0, 2), dtype=np.int64), {k: [] for k in params}
        super().__init__(pairs, params)
        self.exceptions = _IndexedTerm(exception_pairs, exception_params)
        if self.cutoff is not None:
            rf = force.getReactionFieldDielectric()
            self.k_rf = (rf - 1.0) / ((2.0 * rf + 1.0) * self.cutoff ** 3)
            self.c_rf = 1.0 / self.cutoff + self.k_rf * self.cutoff ** 2
            self.switch = _value(force.getSwitchingDistance()) if force.getUseSwitchingFunction() else None

    @staticmethod
    def _lj(p, r):
        s2 = p["sigma"] / r
        s2 = s2 * s2
        s6 = s2 * s2 * s2
        return 4.0 * p["eps"] * s6 * (s6 - 1.0)  # +inf (not inf - inf) for overlapping atoms

    def __call__(self, c):
        (i, j), p = self._on(c.device)
        r = distance(c, i, j)
        if self.cutoff is None:
            pair = ONE_4PI_EPS0 * p["qq"] / r + self._lj(p, r)
        else:
            coulomb = ONE_4PI_EPS0 * p["qq"] * (1.0 / r + self.k_rf * r * r - self.c_rf)
            lj = self._lj(p, r)
            if self.switch is not None:
                t = ((r - self.switch) / (self.cutoff - self.switch)).clamp(min=0.0)
                lj = lj * (1.0 - t ** 3 * (10.0 - 15.0 * t + 6.0 * t * t))
            pair = torch.where(r < self.cutoff, coulomb + lj, torch.zeros_like(r))
        (ei, ej), pe = self.exceptions._on(c.device)
        if len(ei) == 0:
            return pair.sum(0)
        re = distance(c, ei, ej)
        return pair.sum(0) + (ONE_4PI_EPS0 * pe["qq"] / re + self._lj(pe, re)).sum(0)


def _globals(force) -> dict:
    return {force.getGlobalParameterName(g): force.getGlobalParameterDefaultValue(g)
            for g in range(force.getNumGlobalParameters())}


class CustomIndexedTerm(_IndexedTerm):
    """CustomBond/Angle/Torsion/CompoundBond/External forces: the expression evaluated per term."""

    _GEOMETRY = {"CustomBondForce": ("getNumBonds", "getBondParameters", "r"),
                 "CustomAngleForce": ("getNumAngles", "getAngleParameters", "theta"),
                 "CustomTorsionForce": ("getNumTorsions", "getTorsionParameters", "theta"),
                 "CustomExternalForce": ("getNumParticles", "getParticleParameters", None),
                 "CustomCompoundBondForce": ("getNumBonds", "getBondParameters", None)}

    def __init__(self, force):
        self.kind = type(force).__name__
        count, get, self.variable = self._GEOMETRY[self.kind]
        special = ("distance", "angle", "dihedral") if self.kind == "CustomCompoundBondForce" else ()
        self.expression = parse(force.getEnergyFunction(), special, tabulated_functions(force))
        terms = [getattr(force, get)(t) for t in range(getattr(force, count)())]
        if self.kind == "CustomCompoundBondForce":
            atoms = [list(t[0]) for t in terms]
            params = [list(t[1]) for t in terms]
            self.particles = force.getNumParticlesPerBond()
        elif self.kind == "CustomExternalForce":
            atoms, params = [[t[0]] for t in terms], [list(t[1]) for t in terms]
        else:
            width = {"r": 2, "theta": 3 if self.kind == "CustomAngleForce" else 4}[self.variable]
            atoms, params = [list(t[:width]) for t in terms], [list(t[width]) for t in terms]
        names = [force.getPerBondParameterName(k) if hasattr(force, "getPerBondParameterName") else
                 force.getPerTorsionParameterName(k) if hasattr(force, "getPerTorsionParameterName") else
                 force.getPerAngleParameterName(k) if hasattr(force, "getPerAngleParameterName") else
                 force.getPerParticleParameterName(k) for k in range(len(params[0]) if params else 0)]
        width = len(atoms[0]) if atoms else 1
        super().__init__(np.array(atoms, dtype=np.int64).reshape(-1, width),
                         {name: [p[k] for p in params] for k, name in enumerate(names)})
        self.global_values = _globals(force)

    def __call__(self, c):
        atoms, p = self._on(c.device)
        values = dict(self.global_values)
        values.update(p)
        special = None
        if self.kind == "CustomExternalForce":
            pos = c[:, atoms[0]]
            values.update(x=pos[0], y=pos[1], z=pos[2])
        elif self.kind == "CustomCompoundBondForce":
            index = {f"p{k + 1}": atoms[k] for k in range(self.particles)}
            special = {"distance": lambda a, b: distance(c, index[a], index[b]),
                       "angle": lambda a, b, d: bond_angle(c, index[a], index[b], index[d]),
                       "dihedral": lambda a, b, d, e: dihedral(c, index[a], index[b], index[d], index[e])}
        elif self.variable == "r":
            values["r"] = distance(c, *atoms)
        else:
            values["theta"] = (bond_angle if self.kind == "CustomAngleForce" else dihedral)(c, *atoms)
        energy = self.expression.evaluate(values, special)
        return torch.as_tensor(energy, dtype=c.dtype, device=c.device).expand(len(atoms[0]), c.shape[2]).sum(0)


class SequentialTerm:
    """Forces without a vectorized form: their energy per sample from a Reference Context, in a loop.

    Exact (double precision); costs one small OpenMM evaluation per sample (e.g. ~0.1 ms for a CMAP
    of a small peptide), so it is only used for the forces listed in ``names``.
    """

    def __init__(self, system: openmm.System, forces: list):
        sub = openmm.System()
        for i in range(system.getNumParticles()):
            sub.addParticle(system.getParticleMass(i))
        for force in forces:
            sub.addForce(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force)))
        self.names = [type(f).__name__ for f in forces]
        self.context = openmm.Context(sub, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))

    def __call__(self, c):
        positions = c.permute(2, 1, 0).cpu().numpy()
        out = torch.empty(len(positions), dtype=torch.float64)
        for b, pos in enumerate(positions):
            self.context.setPositions(pos)
            out[b] = self.context.getState(getEnergy=True).getPotentialEnergy()._value
        return out.to(c.device)


_VECTORIZED = {"HarmonicBondForce": HarmonicBondTerm, "HarmonicAngleForce": HarmonicAngleTerm,
               "PeriodicTorsionForce": PeriodicTorsionTerm, "RBTorsionForce": RBTorsionTerm,
               "NonbondedForce": NonbondedTerm, "GBSAOBCForce": GBSAOBCTerm, "CustomGBForce": CustomGBTerm,
               **{kind: CustomIndexedTerm for kind in CustomIndexedTerm._GEOMETRY}}


def build_energy_terms(system: openmm.System) -> tuple[list, list[int]]:
    """Return ([(force_index, term)], indices of forces evaluated by a :class:`SequentialTerm`).

    The sequential term, if any, is appended with force index -1. CMMotionRemover has no energy.
    """
    terms, sequential = [], []
    for index, force in enumerate(system.getForces()):
        kind = type(force).__name__
        if kind == "CMMotionRemover":
            continue
        try:
            terms.append((index, _VECTORIZED[kind](force)))
        except (KeyError, ExpressionError, NotImplementedError):
            sequential.append(index)
    if sequential:
        terms.append((-1, SequentialTerm(system, [system.getForce(i) for i in sequential])))
    return terms, sequential

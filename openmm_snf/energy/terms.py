"""Exact per-sample energies and forces of OpenMM forces, vectorized over a batch in torch (float64).

OpenMM reports only the total energy of a Context; the replicated System (see ``replicate.py``)
therefore gives exact forces for a batch but not the energy of each copy. Each class here evaluates
one force's energy for a whole batch from the force's own parameters, with the formulas OpenMM uses
(in double precision, like OpenMM's Reference platform). :func:`build_energy_terms` turns a System
into such terms; forces without a vectorized form here go to :class:`SequentialTerm`, which
evaluates just those forces' energies one sample at a time on a small OpenMM Context (exact, slower).

Every term maps coordinates ``c`` in component-major layout (3, n_atoms, B) float64 nm (see
:func:`to_components`; contiguous rows over the batch keep the arithmetic vectorized) to energies
(B,) float64 kJ/mol. :func:`evaluate_term` also adds the term's gradient dU/dc (3, n_atoms, B) to a
buffer: the harmonic bonded terms, periodic torsions and NonbondedForce have analytic gradients
(written out here, no autograd graph: the fast route on CPUs); every other vectorized term is
differentiated by torch autograd in float64 (exact, about twice the cost of its energy).
"""
from __future__ import annotations

import math

import numpy as np
import openmm
import torch

from .expression import ExpressionError, parse
from .gb import ONE_4PI_EPS0, CustomGBTerm, GBSAOBCTerm, tabulated_functions
from .openmm_access import md_value

__all__ = ["ONE_4PI_EPS0", "build_energy_terms", "evaluate_term", "SequentialTerm", "subsystem", "to_components",
           "distance", "bond_angle", "dihedral"]


def _tensor(values, dtype=torch.float64):
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def to_components(x: torch.Tensor) -> torch.Tensor:
    """(B, n_atoms, 3) positions -> contiguous (3, n_atoms, B) float64 coordinates."""
    return x.to(torch.float64).permute(2, 1, 0).contiguous()


def _cross(a, b):
    """Cross product of (3, ...) tensors along dim 0 (two fused kernels per component, no stack)."""
    if a.requires_grad or b.requires_grad:  # out= kernels do not record autograd graphs
        return torch.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)
    for k, (i, j) in enumerate(((1, 2), (2, 0), (0, 1))):
        torch.mul(a[i], b[j], out=out[k])
        out[k].addcmul_(a[j], b[i], value=-1.0)
    return out


def _dot(a, b):
    return torch.linalg.vecdot(a, b, dim=0)


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


def _gather(c, index):
    return c.index_select(1, index)


def _add_pair_gradient(grad, i, j, g):
    """grad[:, j] += g, grad[:, i] -= g for a gradient g (3, m, B) with respect to r_j - r_i."""
    grad.index_add_(1, j, g)
    grad.index_add_(1, i, g, alpha=-1.0)


class HarmonicBondTerm(_IndexedTerm):
    analytic = True

    def __init__(self, force):
        terms = [force.getBondParameters(t) for t in range(force.getNumBonds())]
        super().__init__([t[:2] for t in terms] or np.zeros((0, 2)),
                         {"r0": [md_value(t[2]) for t in terms], "k": [md_value(t[3]) for t in terms]})

    def __call__(self, c, grad=None):
        (i, j), p = self._on(c.device)
        d = _gather(c, j) - _gather(c, i)
        r = torch.sqrt((d * d).sum(0))
        stretch = r - p["r0"]
        if grad is not None:
            _add_pair_gradient(grad, i, j, (p["k"] * stretch / r) * d)
        return (0.5 * p["k"] * stretch * stretch).sum(0)


class HarmonicAngleTerm(_IndexedTerm):
    analytic = True

    def __init__(self, force):
        terms = [force.getAngleParameters(t) for t in range(force.getNumAngles())]
        super().__init__([t[:3] for t in terms] or np.zeros((0, 3)),
                         {"theta0": [md_value(t[3]) for t in terms], "k": [md_value(t[4]) for t in terms]})

    def __call__(self, c, grad=None):
        (i, j, k), p = self._on(c.device)
        cj = _gather(c, j)
        a, b = _gather(c, i) - cj, _gather(c, k) - cj
        n = _cross(a, b)
        norm_n = torch.sqrt(_dot(n, n))
        ab = _dot(a, b)
        bend = torch.atan2(norm_n, ab) - p["theta0"]
        if grad is not None:
            # d(theta)/da = (a x n) / (|a|^2 |n|) = (a (a.b)/|a|^2 - b) / |n|, and d(theta)/db likewise;
            # OpenMM's Reference kernel bounds |n| below by 1e-6 the same way for (anti)linear angles
            scale = p["k"] * bend / norm_n.clamp(min=1e-6)
            ga = (a * (ab / _dot(a, a)) - b) * scale
            gb = (b * (ab / _dot(b, b)) - a) * scale
            grad.index_add_(1, i, ga)
            grad.index_add_(1, k, gb)
            grad.index_add_(1, j, ga + gb, alpha=-1.0)
        return (0.5 * p["k"] * bend * bend).sum(0)


class PeriodicTorsionTerm(_IndexedTerm):
    """Force fields put several periodicities on one dihedral: each distinct dihedral is computed once."""

    analytic = True

    def __init__(self, force):
        terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        quads = np.array([t[:4] for t in terms], dtype=np.int64).reshape(-1, 4)
        unique, which = np.unique(quads, axis=0, return_inverse=True)
        super().__init__(unique, {"n": [t[4] for t in terms], "phase": [md_value(t[5]) for t in terms],
                                  "k": [md_value(t[6]) for t in terms],
                                  "minus_kn": [-md_value(t[6]) * t[4] for t in terms]})
        self._which = torch.as_tensor(which.reshape(-1), dtype=torch.long)

    def __call__(self, c, grad=None):
        (i, j, k, l), p = self._on(c.device)
        self._which = self._which.to(c.device)
        ci, cj, ck, cl = (_gather(c, a) for a in (i, j, k, l))
        b1, b2, b3 = cj - ci, ck - cj, cl - ck
        n1, n2 = _cross(b1, b2), _cross(b2, b3)
        b2_sq = _dot(b2, b2)
        b2_norm = torch.sqrt(b2_sq)
        phi = torch.atan2(b2_norm * _dot(b1, n2), _dot(n1, n2))  # OpenMM's sign convention, see dihedral()
        angle = p["n"] * phi[self._which] - p["phase"]
        if grad is not None:
            de_dphi = torch.zeros_like(phi).index_add_(0, self._which, p["minus_kn"] * torch.sin(angle))
            _add_dihedral_gradient(grad, (i, j, k, l), (b1, b2, b3), (n1, n2), b2_sq, b2_norm, de_dphi)
        return (p["k"] * (1.0 + torch.cos(angle))).sum(0)


def _add_dihedral_gradient(grad, atoms, bonds, normals, b2_sq, b2_norm, de_dphi):
    """Add dU/dr of dihedral-angle terms with dU/dphi ``de_dphi`` (m, B) (Blondel & Karplus 1996).

    With OpenMM's sign of phi: d(phi)/dr_i = -|b2|/|n1|^2 n1, d(phi)/dr_l = |b2|/|n2|^2 n2, and the
    middle atoms take the rest so that the gradients sum to zero.
    """
    (i, j, k, l), (b1, b2, b3), (n1, n2) = atoms, bonds, normals
    scale = de_dphi * b2_norm
    gi = n1 * (-scale / _dot(n1, n1))
    gl = n2 * (scale / _dot(n2, n2))
    p, q = _dot(b1, b2) / b2_sq, _dot(b3, b2) / b2_sq
    grad.index_add_(1, i, gi)
    grad.index_add_(1, l, gl)
    grad.index_add_(1, j, q * gl - (1.0 + p) * gi)
    grad.index_add_(1, k, p * gi - (1.0 + q) * gl)


class RBTorsionTerm(_IndexedTerm):
    def __init__(self, force):
        terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        super().__init__([t[:4] for t in terms] or np.zeros((0, 4)),
                         {"c": [[md_value(c) for c in t[4:10]] for t in terms] or np.zeros((0, 6))})

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

    analytic = True

    def __init__(self, force):
        n = force.getNumParticles()
        q, sig, eps = (np.array(v) for v in zip(*[[md_value(a) for a in force.getParticleParameters(i)]
                                                   for i in range(n)]))
        exceptions = [force.getExceptionParameters(e) for e in range(force.getNumExceptions())]
        excluded = {(min(e[0], e[1]), max(e[0], e[1])) for e in exceptions}
        pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in excluded],
                         dtype=np.int64).reshape(-1, 2)
        kept = [e for e in exceptions if md_value(e[2]) != 0 or md_value(e[4]) != 0]
        params = {"qq": q[pairs[:, 0]] * q[pairs[:, 1]], "sigma": 0.5 * (sig[pairs[:, 0]] + sig[pairs[:, 1]]),
                  "eps": np.sqrt(eps[pairs[:, 0]] * eps[pairs[:, 1]])}
        exception_pairs = np.array([e[:2] for e in kept], dtype=np.int64).reshape(-1, 2)
        exception_params = {"qq": [md_value(e[2]) for e in kept], "sigma": [md_value(e[3]) for e in kept],
                            "eps": [md_value(e[4]) for e in kept]}
        self.cutoff = None if force.getNonbondedMethod() == 0 else md_value(force.getCutoffDistance())
        if self.cutoff is None:  # same formula for both: one pass over all pairs
            pairs = np.concatenate([pairs, exception_pairs])
            params = {k: np.concatenate([v, exception_params[k]]) for k, v in params.items()}
            exception_pairs, exception_params = np.zeros((0, 2), dtype=np.int64), {k: [] for k in params}
        super().__init__(pairs, self._prepared(params))
        self.exceptions = _IndexedTerm(exception_pairs, self._prepared(exception_params))
        if self.cutoff is not None:
            rf = force.getReactionFieldDielectric()
            self.k_rf = (rf - 1.0) / ((2.0 * rf + 1.0) * self.cutoff ** 3)
            self.c_rf = 1.0 / self.cutoff + self.k_rf * self.cutoff ** 2
            self.switch = md_value(force.getSwitchingDistance()) if force.getUseSwitchingFunction() else None

    def __call__(self, c, grad=None):
        (i, j), p = self._on(c.device)
        if self.cutoff is None:
            energy = self._plain_pairs(c, i, j, p, grad)
        else:
            energy = self._cutoff_pairs(c, i, j, p, grad)
        (ei, ej), pe = self.exceptions._on(c.device)
        if len(ei):
            energy = energy + self._plain_pairs(c, ei, ej, pe, grad)
        return energy

    @staticmethod
    def _geometry(c, i, j):
        d = _gather(c, j) - _gather(c, i)
        inv_r = torch.rsqrt((d * d).sum(0))
        return d, inv_r

    @staticmethod
    def _prepared(params):
        """Per-pair constants of the kernels: 4 eps, sigma^2, q_i q_j / (4 pi eps0)."""
        return {"four_eps": 4.0 * np.asarray(params["eps"], dtype=np.float64),
                "sigma_sq": np.asarray(params["sigma"], dtype=np.float64) ** 2,
                "qq": ONE_4PI_EPS0 * np.asarray(params["qq"], dtype=np.float64)}

    @staticmethod
    def _lj(p, inv_r_sq, derivative):
        """(LJ energy, r * dLJ/dr or None); +inf (not inf - inf) for overlapping atoms."""
        s2 = p["sigma_sq"] * inv_r_sq
        s6 = s2 * s2 * s2
        four_eps_s6 = p["four_eps"] * s6
        r_dlj = four_eps_s6 * (6.0 - 12.0 * s6) if derivative else None
        return four_eps_s6 * (s6 - 1.0), r_dlj

    def _plain_pairs(self, c, i, j, p, grad):
        """Coulomb + LJ without cutoff (all pairs of NoCutoff, exceptions always)."""
        d, inv_r = self._geometry(c, i, j)
        inv_r_sq = inv_r * inv_r
        coulomb = p["qq"] * inv_r
        lj, r_dlj = self._lj(p, inv_r_sq, grad is not None)
        if grad is not None:  # dU/dr / r = (r dU/dr) / r^2, r dCoulomb/dr = -Coulomb
            _add_pair_gradient(grad, i, j, ((r_dlj - coulomb) * inv_r_sq) * d)
        return (coulomb + lj).sum(0)

    def _cutoff_pairs(self, c, i, j, p, grad):
        """Reaction-field Coulomb + (switched) LJ inside the cutoff, zero beyond."""
        d, inv_r = self._geometry(c, i, j)
        r = 1.0 / inv_r
        qq = p["qq"]
        coulomb = qq * (inv_r + self.k_rf * r * r - self.c_rf)
        lj, r_dlj = self._lj(p, inv_r * inv_r, True)
        r_de = qq * (2.0 * self.k_rf * r * r - inv_r)
        if self.switch is not None:
            width = self.cutoff - self.switch
            t = ((r - self.switch) / width).clamp(min=0.0)
            switch = 1.0 - t ** 3 * (10.0 - 15.0 * t + 6.0 * t * t)
            r_dlj = r_dlj * switch - lj * (30.0 * t * t * (1.0 - t) ** 2 / width) * r
            lj = lj * switch
        inside = r < self.cutoff
        zero = torch.zeros_like(r)
        if grad is not None:
            _add_pair_gradient(grad, i, j, (torch.where(inside, r_de + r_dlj, zero) * inv_r * inv_r) * d)
        return torch.where(inside, coulomb + lj, zero).sum(0)


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


def subsystem(system: openmm.System, indices: list[int]) -> openmm.System:
    """A System with the particles of ``system`` and copies of its forces ``indices`` only."""
    sub = openmm.System()
    for i in range(system.getNumParticles()):
        sub.addParticle(system.getParticleMass(i))
    for i in indices:
        sub.addForce(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system.getForce(i))))
    return sub


class SequentialTerm:
    """Forces without a vectorized form: their energy per sample from a Reference Context, in a loop.

    Exact (double precision); costs one small OpenMM evaluation per sample (e.g. ~0.1 ms for a CMAP
    of a small peptide), so it is only used for the forces listed in ``names``.
    """

    def __init__(self, system: openmm.System, indices: list[int]):
        self.names = [type(system.getForce(i)).__name__ for i in indices]
        self.context = openmm.Context(subsystem(system, indices), openmm.VerletIntegrator(1e-3),
                                      openmm.Platform.getPlatformByName("Reference"))

    def __call__(self, c):
        positions = c.permute(2, 1, 0).cpu().numpy()
        out = torch.empty(len(positions), dtype=torch.float64)
        for b, pos in enumerate(positions):
            self.context.setPositions(pos)
            out[b] = md_value(self.context.getState(getEnergy=True).getPotentialEnergy())
        return out.to(c.device)


def evaluate_term(term, c: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Energies (B,) kJ/mol of a vectorized ``term`` at ``c`` (3, n_atoms, B) float64 nm.

    With ``grad`` (a (3, n_atoms, B) float64 buffer), dU/dc in kJ/mol/nm is added to it: analytic for
    terms marked ``analytic``, by autograd (float64, exact) for the others.
    """
    if grad is None:
        return term(c)
    if getattr(term, "analytic", False):
        return term(c, grad)
    with torch.enable_grad():
        leaf = c.detach().requires_grad_(True)
        energy = term(leaf)
        if energy.requires_grad:
            grad += torch.autograd.grad(energy.sum(), leaf)[0]
    return energy.detach()


_VECTORIZED = {"HarmonicBondForce": HarmonicBondTerm, "HarmonicAngleForce": HarmonicAngleTerm,
               "PeriodicTorsionForce": PeriodicTorsionTerm, "RBTorsionForce": RBTorsionTerm,
               "NonbondedForce": NonbondedTerm, "GBSAOBCForce": GBSAOBCTerm, "CustomGBForce": CustomGBTerm,
               **{kind: CustomIndexedTerm for kind in CustomIndexedTerm._GEOMETRY}}


def build_energy_terms(system: openmm.System, sequential_energies: bool = True) -> tuple[list, list[int]]:
    """Return ([(force_index, term)], indices of forces without a vectorized term).

    With ``sequential_energies``, a :class:`SequentialTerm` for those forces is appended with force
    index -1 (energies only). CMMotionRemover has no energy.
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
    if sequential and sequential_energies:
        terms.append((-1, SequentialTerm(system, sequential)))
    return terms, sequential

"""Build one OpenMM System that holds B non-interacting copies of a molecule.

Copy ``b`` owns particles ``b*n .. b*n+n-1`` and is placed at ``x_b + offsets[b]`` (offsets on a cubic
grid centred on the origin, ``spacing`` nm apart). Bonded forces are copied term by term, so the
copies never see each other. Pair forces (NonbondedForce, GBSAOBCForce, CustomGBForce) use a cutoff
that is longer than any distance inside a copy and shorter than any distance between copies:

* an original ``NoCutoff`` force becomes ``CutoffNonPeriodic`` with cutoff ``spacing/2`` (and, for
  NonbondedForce, reaction-field dielectric 1, so every pair only gains the constant
  ``-q_i q_j / (4 pi eps0 r_c)``: forces are exact, energies shift by a per-copy constant);
* an original ``CutoffNonPeriodic`` force keeps its cutoff.

This is exact while the atoms of every copy stay within :func:`max_copy_radius` of a common centre
shifted by ``offsets[b]`` (e.g. the copy's own centroid when the caller recentres each copy).
CustomExternalForce gets the offsets as per-particle parameters (``x`` becomes ``x-snf_ox`` ...), so
a shifted copy feels exactly the external field of the unshifted one. CMMotionRemover is dropped
(it would couple the copies). Periodic systems and unsupported forces raise :class:`ValueError`
naming the force.
"""
from __future__ import annotations

import math

import numpy as np
import openmm

from .expression import substitute_variables, tokenize

__all__ = ["build_replicated_system", "max_copy_radius", "default_spacing", "grid_offsets", "check_supported",
           "SUPPORTED_FORCES"]

_BONDED = {
    "HarmonicBondForce": ("getNumBonds", "getBondParameters", "addBond", 2),
    "HarmonicAngleForce": ("getNumAngles", "getAngleParameters", "addAngle", 3),
    "PeriodicTorsionForce": ("getNumTorsions", "getTorsionParameters", "addTorsion", 4),
    "RBTorsionForce": ("getNumTorsions", "getTorsionParameters", "addTorsion", 4),
}
_CUSTOM_BONDED = {
    "CustomBondForce": ("getNumBonds", "getBondParameters", "addBond", 2),
    "CustomAngleForce": ("getNumAngles", "getAngleParameters", "addAngle", 3),
    "CustomTorsionForce": ("getNumTorsions", "getTorsionParameters", "addTorsion", 4),
}
_PAIR = ("NonbondedForce", "GBSAOBCForce", "CustomGBForce")
SUPPORTED_FORCES = (tuple(_BONDED) + tuple(_CUSTOM_BONDED) + _PAIR
                    + ("CMAPTorsionForce", "CustomCompoundBondForce", "CustomExternalForce", "CMMotionRemover"))
_OFFSET_PARAMETERS = ("snf_ox", "snf_oy", "snf_oz")


def check_supported(system: openmm.System) -> None:
    """Raise ValueError naming the first periodic or unsupported force of ``system``."""
    for index, force in enumerate(system.getForces()):
        kind = type(force).__name__
        if kind not in SUPPORTED_FORCES:
            raise ValueError(f"force {index} ({kind}) is not supported by the batched energy bridge; supported: "
                             f"{', '.join(SUPPORTED_FORCES)}")
        if force.usesPeriodicBoundaryConditions():
            raise ValueError(f"force {index} ({kind}) uses periodic boundary conditions; periodic systems are not "
                             "supported by the batched energy bridge (use a non-periodic or implicit-solvent system)")
        if kind == "NonbondedForce" and (force.getNumParticleParameterOffsets() or
                                         force.getNumExceptionParameterOffsets()):
            raise ValueError(f"force {index} (NonbondedForce) has parameter offsets, which are not supported")
        if kind == "CustomCompoundBondForce":
            absolute = {tok for kind, tok in tokenize(force.getEnergyFunction())
                        if kind == "name" and tok[:1] in "xyz" and tok[1:].isdigit()}
            if absolute:
                raise ValueError(f"force {index} (CustomCompoundBondForce) uses absolute coordinates "
                                 f"{sorted(absolute)}; only distance/angle/dihedral are supported")


def _pair_cutoffs(system: openmm.System) -> list[float | None]:
    """Cutoff (nm) of each pair force, None for NoCutoff."""
    cutoffs = []
    for force in system.getForces():
        if type(force).__name__ in _PAIR:
            uses_cutoff = force.getNonbondedMethod() != 0  # 0 is NoCutoff for all three classes
            cutoffs.append(float(_nm(force.getCutoffDistance())) if uses_cutoff else None)
    return cutoffs


def _nm(value) -> float:
    return value.value_in_unit(openmm.unit.nanometer) if hasattr(value, "value_in_unit") else float(value)


def max_copy_radius(system: openmm.System, spacing: float) -> float:
    """Largest radius (nm) the atoms of one copy may occupy around their centre for exact replicas.

    ``inf`` when the system has no pair forces (copies cannot interact). Strictly smaller radii are
    exact: the bound itself is excluded.
    """
    radius = math.inf
    for cutoff in _pair_cutoffs(system):
        radius = min(radius, spacing / 4.0 if cutoff is None else (spacing - cutoff) / 2.0)
    return radius


def default_spacing(system: openmm.System, copy_radius: float | None = None) -> float:
    """Grid spacing (nm) that keeps copies of radius ``copy_radius`` exact.

    Default radius: ``1 nm + 0.1 nm * n_atoms**(1/3)`` (1.28 nm for alanine dipeptide, whose atoms lie
    within 0.46 nm of their centroid); a small margin keeps the radius strictly inside the bound.
    """
    if copy_radius is None:
        copy_radius = 1.0 + 0.1 * system.getNumParticles() ** (1.0 / 3.0)
    margin = 1.01
    spacing = 1.0
    for cutoff in _pair_cutoffs(system):
        need = 4.0 * copy_radius if cutoff is None else cutoff + 2.0 * copy_radius
        spacing = max(spacing, need * margin)
    return spacing


def grid_offsets(n_copies: int, spacing: float) -> np.ndarray:
    """(n_copies, 3) float64 offsets (nm) on a cubic grid centred on the origin."""
    side = 1
    while side ** 3 < n_copies:
        side += 1
    index = np.arange(n_copies)
    grid = np.stack([index // (side * side), (index // side) % side, index % side], axis=1).astype(np.float64)
    return (grid - (side - 1) / 2.0) * spacing


def build_replicated_system(system: openmm.System, n_copies: int, *,
                            spacing: float | None = None) -> tuple[openmm.System, np.ndarray]:
    """Return (System with ``n_copies`` non-interacting copies, (n_copies, 3) float64 offsets in nm).

    Positions of copy b are ``x_b + offsets[b]`` (particles ``b*n .. b*n+n-1``). Exact while each
    copy stays within ``max_copy_radius(system, spacing)`` of its centre (see module docstring).
    Forces keep their force groups and names. Raises ValueError for periodic/unsupported forces.
    """
    if int(n_copies) != n_copies or n_copies < 1:
        raise ValueError(f"n_copies must be a positive integer, got {n_copies!r}")
    n_copies = int(n_copies)
    check_supported(system)
    spacing = default_spacing(system) if spacing is None else float(spacing)
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if not max_copy_radius(system, spacing) > 0:
        raise ValueError(f"spacing {spacing} nm is not larger than the cutoff of the system's pair forces")
    offsets = grid_offsets(n_copies, spacing)
    n = system.getNumParticles()
    out = openmm.System()
    for _ in range(n_copies):
        for i in range(n):
            out.addParticle(system.getParticleMass(i))
    for b in range(n_copies):
        for c in range(system.getNumConstraints()):
            i, j, d = system.getConstraintParameters(c)
            out.addConstraint(i + b * n, j + b * n, d)
    for force in system.getForces():
        kind = type(force).__name__
        if kind == "CMMotionRemover":
            continue
        clone = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force))
        _replicate_force(kind, clone, n, n_copies, offsets, spacing)
        out.addForce(clone)
    return out, offsets


def _replicate_force(kind, force, n, n_copies, offsets, spacing) -> None:
    """Extend ``force`` (a clone holding copy 0) in place to all copies."""
    if kind in _BONDED or kind in _CUSTOM_BONDED:
        count, get, add, n_atoms = (_BONDED.get(kind) or _CUSTOM_BONDED[kind])
        terms = [getattr(force, get)(t) for t in range(getattr(force, count)())]
        for b in range(1, n_copies):
            for term in terms:
                getattr(force, add)(*[a + b * n for a in term[:n_atoms]], *term[n_atoms:])
    elif kind == "CMAPTorsionForce":
        terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        for b in range(1, n_copies):
            for m, *atoms in terms:
                force.addTorsion(m, *[a + b * n for a in atoms])
    elif kind == "CustomCompoundBondForce":
        terms = [force.getBondParameters(t) for t in range(force.getNumBonds())]
        for b in range(1, n_copies):
            for atoms, params in terms:
                force.addBond([a + b * n for a in atoms], params)
    elif kind == "CustomExternalForce":
        _replicate_external(force, n, n_copies, offsets)
    else:
        _replicate_pair_force(kind, force, n, n_copies, spacing)


def _replicate_external(force, n, n_copies, offsets) -> None:
    mapping = {axis: f"({axis}-{name})" for axis, name in zip("xyz", _OFFSET_PARAMETERS)}
    force.setEnergyFunction(substitute_variables(force.getEnergyFunction(), mapping))
    for name in _OFFSET_PARAMETERS:
        force.addPerParticleParameter(name)
    terms = [force.getParticleParameters(t) for t in range(force.getNumParticles())]
    for t, (atom, params) in enumerate(terms):
        force.setParticleParameters(t, atom, [*params, *offsets[0]])
    for b in range(1, n_copies):
        for atom, params in terms:
            force.addParticle(atom + b * n, [*params, *offsets[b]])


def _replicate_pair_force(kind, force, n, n_copies, spacing) -> None:
    if force.getNonbondedMethod() == 0:
        force.setNonbondedMethod(1)  # CutoffNonPeriodic in NonbondedForce, GBSAOBCForce and CustomGBForce
        force.setCutoffDistance(spacing / 2.0)
        if kind == "NonbondedForce":
            force.setReactionFieldDielectric(1.0)  # no reaction field: each pair only gains a constant
    particles = [force.getParticleParameters(i) for i in range(n)]
    for b in range(1, n_copies):
        for params in particles:
            if kind == "CustomGBForce":
                force.addParticle(params)
            else:
                force.addParticle(*params)
    if kind == "NonbondedForce":
        force.setUseDispersionCorrection(False)
        exceptions = [force.getExceptionParameters(e) for e in range(force.getNumExceptions())]
        for b in range(1, n_copies):
            for i, j, qq, sigma, eps in exceptions:
                force.addException(i + b * n, j + b * n, qq, sigma, eps)
    elif kind == "CustomGBForce":
        exclusions = [force.getExclusionParticles(e) for e in range(force.getNumExclusions())]
        for b in range(1, n_copies):
            for i, j in exclusions:
                force.addExclusion(i + b * n, j + b * n)

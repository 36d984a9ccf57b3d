"""Collective variables of a trajectory, by name or by definition.

A CV is looked up, in this order, as

1. a name in the ``cvs`` dictionary passed in (a MolecularSystem's metadata, plus user definitions),
   each entry a definition such as ``{"kind": "dihedral", "atoms": [4, 6, 8, 14]}`` or
   ``{"kind": "position", "atom": 0, "axis": 0}``;
2. a spec string ``kind:arguments``: ``dihedral:4,6,8,14``, ``angle:0,1,2``, ``distance:0,5``,
   ``position:0,x``, ``rmsd`` or ``rmsd:<mdtraj selection>`` (needs a reference structure);
3. a backbone torsion from the topology via mdtraj: ``phi``, ``psi``, ``omega``, ``chi1`` .. ``chi4``;
   with several residues, ``phi[ALA2]`` picks the one of residue ALA2 (name and number as in the PDB)
   and ``phi[i]`` the i-th one (0-based). ``umbrella`` biases the same atoms (:func:`resolve_dihedral`).

Units: angles and dihedrals in radians (dihedrals in (-pi, pi]), distances, positions and RMSD in nm.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import CVError

__all__ = ["KINDS", "TORSIONS", "compute_cv", "compute_cvs", "known_cv_names", "parse_cv_spec",
           "parse_cv_definition", "resolve_dihedral", "torsion_atoms"]

KINDS = ("dihedral", "angle", "distance", "position", "rmsd")
_N_ATOMS = {"dihedral": 4, "angle": 3, "distance": 2}
_AXES = {"x": 0, "y": 1, "z": 2, "0": 0, "1": 1, "2": 2}
TORSIONS = ("phi", "psi", "omega", "chi1", "chi2", "chi3", "chi4")
_TORSION = re.compile(r"^(phi|psi|omega|chi[1-4])(?:\[(\w+)\])?$")


def _torsion_function(name: str):
    import mdtraj
    return getattr(mdtraj, f"compute_{name}")


def parse_cv_spec(spec: str) -> dict:
    """Turn ``"dihedral:4,6,8,14"`` (or angle/distance/position/rmsd) into a definition dictionary."""
    kind, _, args = spec.partition(":")
    kind, args = kind.strip().lower(), args.strip()
    if kind not in KINDS:
        raise CVError(f"CV spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "rmsd":
        return {"kind": "rmsd", "selection": args or "all"}
    parts = [p.strip() for p in args.split(",") if p.strip()]
    if kind == "position":
        if len(parts) != 2 or parts[1].lower() not in _AXES or not parts[0].isdigit():
            raise CVError(f"CV spec {spec!r}: expected position:ATOM,AXIS with AXIS one of x, y, z")
        return {"kind": "position", "atom": int(parts[0]), "axis": _AXES[parts[1].lower()]}
    if len(parts) != _N_ATOMS[kind] or not all(p.isdigit() for p in parts):
        raise CVError(f"CV spec {spec!r}: a {kind} needs {_N_ATOMS[kind]} comma-separated atom indices "
                      f"(0-based), e.g. {kind}:{','.join(str(i) for i in range(_N_ATOMS[kind]))}")
    return {"kind": kind, "atoms": [int(p) for p in parts]}


def parse_cv_definition(text: str) -> tuple[str, dict]:
    """Parse a user definition ``NAME=SPEC`` (e.g. ``"d=distance:0,5"``) into ``(name, definition)``."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise CVError(f"CV definition {text!r}: expected NAME=SPEC with NAME a word, e.g. d=distance:0,5")
    return name, parse_cv_spec(spec)


def _check_atoms(atoms, n_atoms: int, name: str) -> list[int]:
    atoms = [int(a) for a in atoms]
    bad = [a for a in atoms if not 0 <= a < n_atoms]
    if bad:
        raise CVError(f"CV {name!r}: atom index {bad[0]} out of range for a topology of {n_atoms} atoms (0-based)")
    return atoms


def _from_definition(traj, name: str, definition: dict, reference) -> np.ndarray:
    import mdtraj
    kind = definition.get("kind")
    if kind not in KINDS:
        raise CVError(f"CV {name!r}: unknown kind {kind!r} in {definition}; use one of {', '.join(KINDS)}")
    if kind == "rmsd":
        if reference is None:
            raise CVError(f"CV {name!r} is an RMSD and needs a reference structure (reference=..., --reference)")
        try:
            atoms = traj.topology.select(definition.get("selection", "all"))
        except Exception as err:  # mdtraj raises assorted errors for a bad selection string
            raise CVError(f"CV {name!r}: bad atom selection {definition.get('selection')!r}: {err}") from err
        if atoms.size == 0:
            raise CVError(f"CV {name!r}: selection {definition.get('selection')!r} matches no atoms")
        if reference.n_atoms != traj.n_atoms:
            raise CVError(f"CV {name!r}: the reference has {reference.n_atoms} atoms, the trajectory {traj.n_atoms}")
        return mdtraj.rmsd(traj, reference, 0, atom_indices=atoms).astype(np.float64)
    if kind == "position":
        atom = _check_atoms([definition.get("atom", -1)], traj.n_atoms, name)[0]
        axis = definition.get("axis")
        axis = _AXES.get(str(axis).lower()) if axis is not None else None
        if axis is None:
            raise CVError(f"CV {name!r}: position needs an axis (0/1/2 or x/y/z), got {definition.get('axis')!r}")
        return traj.xyz[:, atom, axis].astype(np.float64)
    atoms = definition.get("atoms") or []
    if len(atoms) != _N_ATOMS[kind]:
        raise CVError(f"CV {name!r}: a {kind} needs {_N_ATOMS[kind]} atoms, got {atoms}")
    index = np.array([_check_atoms(atoms, traj.n_atoms, name)])
    compute = {"dihedral": mdtraj.compute_dihedrals, "angle": mdtraj.compute_angles,
               "distance": mdtraj.compute_distances}[kind]
    return compute(traj, index)[:, 0].astype(np.float64)


def _torsion_table(topology) -> dict[str, list[tuple[str, list[int]]]]:
    """{torsion name: [(residue label, 4 atom indices), ...]} for the torsions mdtraj finds in ``topology``.

    A torsion belongs to the residue of its second atom: phi_i = C(i-1) N(i) CA(i) C(i), psi_i = N CA C
    N(i+1), omega_i = CA(i) C(i) N(i+1) CA(i+1), chi_i from N CA of residue i. Labels are mdtraj's
    ``ALA2`` (residue name and number as in the PDB).
    """
    import mdtraj
    probe = mdtraj.Trajectory(np.zeros((1, topology.n_atoms, 3)), topology)
    table = {}
    for name in TORSIONS:
        atoms = _torsion_function(name)(probe)[0]
        if len(atoms):
            table[name] = [(str(topology.atom(int(quad[1])).residue), [int(a) for a in quad]) for quad in atoms]
    return table


def known_cv_names(traj, cvs: dict | None = None) -> list[str]:
    """The names :func:`compute_cv` accepts for ``traj`` (besides spec strings and torsion indices)."""
    names = list(cvs or {})
    for torsion, entries in _torsion_table(traj.topology).items():
        if torsion not in names:
            names += [torsion] if len(entries) == 1 else [f"{torsion}[{label}]" for label, _ in entries]
    return names


def torsion_atoms(topology, name: str) -> list[int] | None:
    """The 4 atom indices (0-based) of a torsion named ``phi``, ``psi[ALA2]``, ``chi1[1]`` ...; None if ``name``
    is not a torsion name. ``[ALA2]`` picks a residue by its label, ``[1]`` the i-th torsion of that kind.

    Raises:
        CVError: the topology has no such torsion, the residue has none, or a bare name is ambiguous.
    """
    match = _TORSION.match(name)
    if not match:
        return None
    torsion, which = match.group(1), match.group(2)
    entries = _torsion_table(topology).get(torsion, [])
    if not entries:
        known = [n for n, e in _torsion_table(topology).items()]
        raise CVError(f"the topology defines no {torsion} torsion (it has: {', '.join(known) or 'none'}); give a "
                      "spec such as dihedral:I,J,K,L")
    labels = [label for label, _ in entries]
    if which is None:
        if len(entries) > 1:
            raise CVError(f"CV {name!r} is ambiguous: the topology has {len(entries)} {torsion} torsions; name the "
                          f"residue ({', '.join(f'{torsion}[{label}]' for label in labels)}) or the index "
                          f"{torsion}[0] .. {torsion}[{len(entries) - 1}]")
        return entries[0][1]
    if which.isdigit():
        if int(which) >= len(entries):
            raise CVError(f"CV {name!r}: only {len(entries)} {torsion} torsion(s) (indices 0..{len(entries) - 1})")
        return entries[int(which)][1]
    for label, atoms in entries:
        if label.upper() == which.upper():
            return atoms
    raise CVError(f"CV {name!r}: no {torsion} torsion in residue {which}; residues with one: {', '.join(labels)}")


def resolve_dihedral(topology, name: str, cvs: dict | None = None) -> list[int]:
    """The 4 atoms of a dihedral CV, resolved as :func:`compute_cv` does: a ``cvs`` entry, a
    ``dihedral:i,j,k,l`` spec, or a torsion name from the topology (``phi``, ``psi[ALA2]``).

    Raises:
        CVError: unknown name, or a CV that is not a dihedral.
    """
    cvs = cvs or {}
    if name in cvs or ":" in name:
        definition = cvs[name] if name in cvs else parse_cv_spec(name)
        if definition.get("kind") != "dihedral":
            raise CVError(f"CV {name!r} is a {definition.get('kind')}, not a dihedral")
        return _check_atoms(definition.get("atoms") or [], topology.n_atoms, name)
    atoms = torsion_atoms(topology, name)
    if atoms is None:
        import mdtraj
        known = known_cv_names(mdtraj.Trajectory(np.zeros((1, topology.n_atoms, 3)), topology), cvs)
        raise CVError(f"unknown dihedral {name!r}; known CVs: {', '.join(known) or 'none'}; or give "
                      "dihedral:I,J,K,L (0-based atom indices)")
    return atoms


def compute_cv(traj, name: str, *, cvs: dict | None = None, reference=None) -> np.ndarray:
    """Values (n_frames,) float64 of one CV of an ``mdtraj.Trajectory``.

    Args:
        traj: ``mdtraj.Trajectory`` (nm).
        name: a key of ``cvs``, a spec such as ``dihedral:4,6,8,14``, or a torsion name (``phi``, ``psi[ALA2]``,
            ``psi[1]``).
        cvs: named definitions, e.g. ``MolecularSystem.cvs``.
        reference: ``mdtraj.Trajectory`` whose first frame is the RMSD reference.
    Raises:
        CVError: unknown name (the message lists the known ones) or invalid definition.
    """
    cvs = cvs or {}
    if name in cvs:
        return _from_definition(traj, name, cvs[name], reference)
    if ":" in name or name.lower() == "rmsd":
        return _from_definition(traj, name, parse_cv_spec(name), reference)
    atoms = torsion_atoms(traj.topology, name)
    if atoms is not None:
        return _from_definition(traj, name, {"kind": "dihedral", "atoms": atoms}, reference)
    raise CVError(f"unknown collective variable {name!r}; known: {', '.join(known_cv_names(traj, cvs)) or 'none'}; "
                  f"or give a spec like dihedral:I,J,K,L, angle:I,J,K, distance:I,J, position:I,x, rmsd")


def compute_cvs(traj, names, *, cvs: dict | None = None, reference=None) -> dict[str, np.ndarray]:
    """:func:`compute_cv` for several names: ``{name: (n_frames,) float64}``."""
    return {name: compute_cv(traj, name, cvs=cvs, reference=reference) for name in names}

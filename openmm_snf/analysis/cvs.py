"""Collective variables of a trajectory, by name or by definition.

A CV is looked up, in this order, as

1. a name in the ``cvs`` dictionary passed in (a MolecularSystem's metadata, plus user definitions),
   each entry a definition such as ``{"kind": "dihedral", "atoms": [4, 6, 8, 14]}`` or
   ``{"kind": "position", "atom": 0, "axis": 0}``;
2. a spec string ``kind:arguments``: ``dihedral:4,6,8,14``, ``angle:0,1,2``, ``distance:0,5``,
   ``position:0,x``, ``rmsd`` or ``rmsd:<mdtraj selection>`` (needs a reference structure);
3. a backbone torsion from the topology via mdtraj: ``phi``, ``psi``, ``omega``, ``chi1`` .. ``chi4``;
   with several residues, ``phi[i]`` picks the i-th one.

Units: angles and dihedrals in radians (dihedrals in (-pi, pi]), distances, positions and RMSD in nm.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import CVError

__all__ = ["KINDS", "compute_cv", "compute_cvs", "known_cv_names", "parse_cv_spec", "parse_cv_definition"]

KINDS = ("dihedral", "angle", "distance", "position", "rmsd")
_N_ATOMS = {"dihedral": 4, "angle": 3, "distance": 2}
_AXES = {"x": 0, "y": 1, "z": 2, "0": 0, "1": 1, "2": 2}
_TORSION = re.compile(r"^(phi|psi|omega|chi[1-4])(?:\[(\d+)\])?$")


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


def _available_torsions(topology) -> dict[str, int]:
    """Backbone/side-chain torsion names defined by the topology, with how many of each."""
    import mdtraj
    probe = mdtraj.Trajectory(np.zeros((1, topology.n_atoms, 3)), topology)
    counts = {}
    for name in ("phi", "psi", "omega", "chi1", "chi2", "chi3", "chi4"):
        n = len(_torsion_function(name)(probe)[0])
        if n:
            counts[name] = n
    return counts


def known_cv_names(traj, cvs: dict | None = None) -> list[str]:
    """The names :func:`compute_cv` accepts for ``traj`` (besides spec strings)."""
    names = list(cvs or {})
    for torsion, count in _available_torsions(traj.topology).items():
        if torsion not in names:
            names += [torsion] if count == 1 else [f"{torsion}[{i}]" for i in range(count)]
    return names


def _torsion(traj, name: str, match) -> np.ndarray:
    torsion, index = match.group(1), match.group(2)
    atoms, values = _torsion_function(torsion)(traj)
    if len(atoms) == 0:
        raise CVError(f"the topology defines no {torsion} torsion; known CVs: {', '.join(known_cv_names(traj))}")
    if index is None:
        if len(atoms) > 1:
            raise CVError(f"CV {name!r} is ambiguous: the topology has {len(atoms)} {torsion} torsions; "
                          f"use {torsion}[0] .. {torsion}[{len(atoms) - 1}]")
        return values[:, 0].astype(np.float64)
    if int(index) >= len(atoms):
        raise CVError(f"CV {name!r}: only {len(atoms)} {torsion} torsion(s) (indices 0..{len(atoms) - 1})")
    return values[:, int(index)].astype(np.float64)


def compute_cv(traj, name: str, *, cvs: dict | None = None, reference=None) -> np.ndarray:
    """Values (n_frames,) float64 of one CV of an ``mdtraj.Trajectory``.

    Args:
        traj: ``mdtraj.Trajectory`` (nm).
        name: a key of ``cvs``, a spec such as ``dihedral:4,6,8,14``, or a torsion name (``phi``, ``psi[1]``).
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
    match = _TORSION.match(name)
    if match:
        return _torsion(traj, name, match)
    raise CVError(f"unknown collective variable {name!r}; known: {', '.join(known_cv_names(traj, cvs)) or 'none'}; "
                  f"or give a spec like dihedral:I,J,K,L, angle:I,J,K, distance:I,J, position:I,x, rmsd")


def compute_cvs(traj, names, *, cvs: dict | None = None, reference=None) -> dict[str, np.ndarray]:
    """:func:`compute_cv` for several names: ``{name: (n_frames,) float64}``."""
    return {name: compute_cv(traj, name, cvs=cvs, reference=reference) for name in names}

"""Z-matrix: which atoms place each atom (bond, angle and torsion references).

A z-matrix row ``[a, b, c, d]`` places atom ``a`` at bond length ``|a - b|``, angle ``a-b-c`` and
torsion (dihedral) ``a-b-c-d``, from atoms ``b, c, d`` that are already placed. ``-1`` marks a missing
reference; only the first three rows of a *global* z-matrix may have them (row 0: no references,
row 1: a bond, row 2: a bond and an angle).

A :class:`ZMatrix` also names a *rigid block*: atoms that the "mixed" scheme of
:class:`~openmm_snf.coordinates.transform.InternalCoordinateTransform` keeps in (whitened) Cartesian
coordinates. A z-matrix usable by the mixed scheme has a complete row for every atom outside the
block (references may be block atoms); one usable by the global scheme has a row for every atom.
:meth:`ZMatrix.from_topology` builds one that serves both.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .graph import MolecularGraph

__all__ = ["ZMatrix", "ZMatrixError", "find_row"]


class ZMatrixError(ValueError):
    """A z-matrix is malformed, or cannot be built for a molecule; the message says why."""


class ZMatrix:
    """Placement rows of a molecule plus the rigid block of the mixed scheme.

    Args:
        rows: (n_rows, 4) integers ``[atom, bond_ref, angle_ref, torsion_ref]``, ``-1`` for missing; in any
            order (they are reordered so that references are placed first, keeping the given order otherwise).
        rigid: atoms of the mixed scheme's Cartesian block (at least 3, or empty for global only).
        n_atoms: number of atoms of the molecule (default: inferred from rows and rigid).

    Attributes:
        rows: (n_rows, 4) int64 array, in placement order (references precede their users).
        rigid: (n_rigid,) int64 array, sorted.
        n_atoms: int.
        supports_mixed, supports_global: which transform schemes this z-matrix can serve.
    """

    def __init__(self, rows, rigid=(), n_atoms: int | None = None):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        rigid = np.asarray(sorted(int(i) for i in rigid), dtype=np.int64)
        if n_atoms is None:
            n_atoms = int(max(rows.max(initial=-1), rigid.max(initial=-1))) + 1
        if n_atoms < 3:
            raise ZMatrixError(f"internal coordinates need at least 3 atoms, got {n_atoms}")
        if rows.size and (rows.min() < -1 or rows.max() >= n_atoms):
            raise ZMatrixError(f"z-matrix indices must lie in [-1, {n_atoms - 1}]")
        if rows.size and (rows[:, 0] < 0).any():
            raise ZMatrixError("the first column of a z-matrix (the placed atom) cannot be -1")
        if len(set(rows[:, 0].tolist())) != len(rows):
            raise ZMatrixError("an atom appears in more than one z-matrix row")
        if len(set(rigid.tolist())) != len(rigid) or (rigid.size and (rigid.min() < 0 or rigid.max() >= n_atoms)):
            raise ZMatrixError(f"rigid block {rigid.tolist()} has repeated or out-of-range atoms")
        for row in rows:
            refs = [int(r) for r in row[1:] if r >= 0]
            if row[0] in refs or len(set(refs)) != len(refs):
                raise ZMatrixError(f"z-matrix row {row.tolist()} repeats an atom")
        self.rows, self.rigid, self.n_atoms = _dependency_order(rows, rigid), rigid, int(n_atoms)
        self._mixed_error = self._check_mixed()
        self._global_error = self._check_global()
        if self._mixed_error and self._global_error:
            raise ZMatrixError(f"z-matrix is usable by no scheme: mixed: {self._mixed_error}; "
                               f"global: {self._global_error}")

    # ------------------------------------------------------------------ validation
    def _check_mixed(self) -> str | None:
        if len(self.rigid) < 3:
            return "the rigid block needs at least 3 atoms"
        block = set(self.rigid.tolist())
        placed = set(block)
        for row in self.rows:
            if row[0] in block:
                continue  # a global-scheme row of a block atom: unused by the mixed scheme
            if (row[1:] < 0).any():
                return f"row {row.tolist()} lacks references"
            missing = [int(r) for r in row[1:] if r not in placed]
            if missing:
                return f"row {row.tolist()} references atoms {missing} before they are placed"
            placed.add(int(row[0]))
        if len(placed) != self.n_atoms:
            return f"atoms {sorted(set(range(self.n_atoms)) - placed)} are neither in a row nor in the block"
        return None

    def _check_global(self) -> str | None:
        if len(self.rows) != self.n_atoms:
            return f"needs one row per atom ({self.n_atoms}), got {len(self.rows)}"
        placed: set[int] = set()
        for k, row in enumerate(self.rows):
            n_refs = min(k, 3)
            if (row[1:1 + n_refs] < 0).any() or (row[1 + n_refs:] >= 0).any():
                return f"row {k} {row.tolist()} must have exactly {n_refs} reference(s) (first three rows are partial)"
            missing = [int(r) for r in row[1:1 + n_refs] if r not in placed]
            if missing:
                return f"row {row.tolist()} references atoms {missing} before they are placed"
            placed.add(int(row[0]))
        return None

    @property
    def supports_mixed(self) -> bool:
        return self._mixed_error is None

    @property
    def supports_global(self) -> bool:
        return self._global_error is None

    def require(self, scheme: str) -> None:
        """Raise :class:`ZMatrixError` if this z-matrix cannot serve ``scheme`` ("mixed" or "global")."""
        error = {"mixed": self._mixed_error, "global": self._global_error}[scheme]
        if error:
            raise ZMatrixError(f"this z-matrix cannot be used with scheme={scheme!r}: {error}")

    def rows_for(self, scheme: str) -> np.ndarray:
        """The rows a scheme uses: mixed: complete rows of non-block atoms; global: all rows."""
        self.require(scheme)
        if scheme == "global":
            return self.rows
        return self.rows[~np.isin(self.rows[:, 0], self.rigid)]

    # ------------------------------------------------------------------ queries
    def torsion_row(self, atoms, scheme: str = "mixed") -> int | None:
        """Index (within :meth:`rows_for`) of the row whose torsion is the dihedral of ``atoms``, or None.

        The dihedral a-b-c-d equals d-c-b-a, so both orders match.
        """
        return find_row(self.rows_for(scheme), atoms)

    def __repr__(self) -> str:
        return f"ZMatrix(n_atoms={self.n_atoms}, rows={len(self.rows)}, rigid={self.rigid.tolist()})"

    # ------------------------------------------------------------------ construction from a topology
    @classmethod
    def from_topology(cls, topology, *, root: int | None = None) -> "ZMatrix":
        """Build a z-matrix from the bond graph of an ``openmm.app.Topology`` or ``mdtraj.Topology``
        (:meth:`from_graph` of :meth:`MolecularGraph.from_topology <.graph.MolecularGraph.from_topology>`)."""
        return cls.from_graph(MolecularGraph.from_topology(topology), root=root)

    @classmethod
    def from_graph(cls, graph: MolecularGraph, *, root: int | None = None) -> "ZMatrix":
        """Build a z-matrix from a molecule's bond graph.

        Deterministic (depends only on the bond graph, atom names and elements), and usable by both schemes:

        * **Root and rigid block**: the root is the most central heavy atom of the main chain (peptide
          backbone atoms N, CA, C and the ACE/NME cap carbons/nitrogen if the names are found, otherwise
          the longest heavy-atom path) of the largest fragment; ``root=`` overrides it. The rigid block is
          the root and its bonded neighbours (alanine dipeptide: CA and N, HA, CB, C = atoms [6, 8, 9, 10, 14],
          the block of the SNF paper).
        * **Placement tree**: breadth-first from the root; among the children of an atom, main-chain atoms
          come first, then other heavy atoms, then hydrogens (ties by atom index). Rows are then ordered
          heavy atoms before hydrogens (the root and its neighbours stay first).
        * **References**: bond = tree parent, angle = grandparent, torsion = great-grandparent, so
          backbone torsions (phi, psi) appear as torsions. The second and later children of an atom
          take the first-placed sibling as torsion reference (methyl/amide hydrogens get their offset
          from the sibling, ~±120 deg, instead of a second copy of the same rotor). Where the tree gives
          no reference (near the root), the earliest placed bonded neighbour is used, then any placed atom.
        * **Rings**: the bond that closes a ring is not a coordinate; its length follows from the others.
        * **Several fragments** (chains, ions, waters): each further fragment hangs from the main root by
          a virtual bond, i.e. its position and orientation become a distance, angles and torsions
          relative to the main fragment.
        """
        if graph.n_atoms < 3:
            raise ZMatrixError(f"internal coordinates need at least 3 atoms, the topology has {graph.n_atoms}")
        main_root = graph.choose_root() if root is None else int(root)
        if not 0 <= main_root < graph.n_atoms:
            raise ZMatrixError(f"root atom {root} is out of range for {graph.n_atoms} atoms")
        adjacency = [list(n) for n in graph.neighbors]
        virtual = []
        for fragment in graph.fragments():
            if main_root not in fragment:
                frag_root = graph.choose_root(fragment)
                adjacency[main_root].append(frag_root)
                adjacency[frag_root].append(main_root)
                virtual.append(frag_root)
        # virtual bonds sort after every real one, so that real neighbours are preferred as references
        order, parent = _breadth_first(main_root, adjacency,
                                       lambda a: (a in virtual,) + graph.priority(a))
        rows = _references(order, parent, adjacency)
        block = [main_root] + [a for a in graph.neighbors[main_root]]
        n_head = max(len(block), 3)
        position = {atom: k for k, atom in enumerate(order)}
        tail = sorted(rows[n_head:], key=lambda row: (graph.is_hydrogen[row[0]], position[row[0]]))
        if not _references_precede(rows[:n_head] + tail, set()):
            tail = rows[n_head:]  # an unusual graph (e.g. a hydrogen with two bonds): keep breadth-first order
        return cls(rows[:n_head] + tail, rigid=block if len(block) >= 3 else (), n_atoms=graph.n_atoms)


def find_row(rows: np.ndarray, atoms) -> int | None:
    """Index of the complete row of ``rows`` whose torsion is the dihedral of ``atoms`` (either order), or None."""
    target = [int(a) for a in atoms]
    for k, row in enumerate(rows):
        if (row >= 0).all() and (row.tolist() == target or row.tolist() == target[::-1]):
            return k
    return None


def _references_precede(rows, placed: set[int]) -> bool:
    placed = set(placed)
    for row in rows:
        if any(r >= 0 and r not in placed for r in row[1:]):
            return False
        placed.add(row[0])
    return True


def _dependency_order(rows: np.ndarray, rigid: np.ndarray) -> np.ndarray:
    """Rows in an order where every reference is placed (by an earlier row, or as a block atom without a
    row) before it is used: the given order if it is one, else a stable reordering by placement rounds.
    Rows that can never be placed are left at the end, for validation to report."""
    placed = set(rigid.tolist()) - set(rows[:, 0].tolist())
    if _references_precede(rows.tolist(), placed):
        return rows
    remaining, ordered = list(range(len(rows))), []
    while remaining:
        ready = [k for k in remaining if all(r < 0 or r in placed for r in rows[k, 1:])]
        if not ready:
            break
        ordered += ready
        placed.update(rows[ready, 0].tolist())
        ready_set = set(ready)
        remaining = [k for k in remaining if k not in ready_set]
    return rows[ordered + remaining]


def _breadth_first(root: int, adjacency, priority) -> tuple[list[int], dict[int, int]]:
    """Breadth-first placement order from ``root``; children sorted by ``priority`` (smaller first)."""
    order, parent, queue = [root], {root: -1}, deque([root])
    while queue:
        atom = queue.popleft()
        for child in sorted((n for n in adjacency[atom] if n not in parent), key=priority):
            parent[child] = atom
            order.append(child)
            queue.append(child)
    if len(order) != len(adjacency):
        raise ZMatrixError("internal error: the placement tree does not reach every atom")
    return order, parent


def _references(order: list[int], parent: dict[int, int], adjacency) -> list[list[int]]:
    """Rows [a, b, c, d] for atoms in placement order (see :meth:`ZMatrix.from_topology`)."""
    position = {atom: k for k, atom in enumerate(order)}
    rows = []
    for k, atom in enumerate(order):
        placed = order[:k]

        def earliest(candidates, exclude):
            found = [x for x in candidates if x not in exclude and position[x] < k]
            return min(found, key=position.get) if found else -1

        b = parent[atom]
        if b < 0:
            rows.append([atom, -1, -1, -1])
            continue
        c = parent[b]
        if c < 0:
            c = earliest(adjacency[b], {atom})
        if c < 0:
            c = earliest(placed, {atom, b})
        if c < 0:
            rows.append([atom, b, -1, -1])
            continue
        siblings = [x for x in adjacency[b] if parent.get(x) == b]
        d = earliest(siblings, {atom, c})
        if d < 0 and parent[c] >= 0 and parent[c] not in (atom, b):
            d = parent[c]
        for candidates in (adjacency[c], adjacency[b], placed):
            if d < 0:
                d = earliest(candidates, {atom, b, c})
        rows.append([atom, b, c, d])
    return rows

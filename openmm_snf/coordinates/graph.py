"""The bond graph of a molecule, read from an OpenMM or mdtraj topology, with the few queries a z-matrix needs."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["MolecularGraph"]

# Peptide main chain by atom names (the convention mdtraj uses to find phi/psi): N, CA, C of amino acids,
# and the heavy atoms of the usual caps.
_BACKBONE_NAMES = {"N", "CA", "C"}
_CAP_NAMES = {"ACE": {"CH3", "C"}, "NME": {"N", "C", "CH3"}, "NMA": {"N", "C", "CH3"}}


@dataclass
class MolecularGraph:
    """Atoms (names, residue names, hydrogen flags) and bonds of a molecule.

    Attributes:
        neighbors: for each atom, the sorted list of bonded atoms.
        is_hydrogen: for each atom, whether it is a hydrogen (element H, or name starting with H if no element).
        main_chain: atoms of the main chain (peptide backbone if named so, else the longest heavy-atom path
            of each fragment).
    """

    neighbors: list[list[int]]
    is_hydrogen: list[bool]
    main_chain: set[int]

    @property
    def n_atoms(self) -> int:
        return len(self.neighbors)

    @classmethod
    def from_topology(cls, topology) -> "MolecularGraph":
        """Read an ``openmm.app.Topology`` or an ``mdtraj.Topology``."""
        atoms = list(topology.atoms() if callable(getattr(topology, "atoms", None)) else topology.atoms)
        bonds = list(topology.bonds() if callable(getattr(topology, "bonds", None)) else topology.bonds)
        index = {id(atom): k for k, atom in enumerate(atoms)}
        neighbors: list[set[int]] = [set() for _ in atoms]
        for bond in bonds:
            i, j = index[id(bond[0])], index[id(bond[1])]
            if i != j:
                neighbors[i].add(j)
                neighbors[j].add(i)
        is_h = [_is_hydrogen(atom) for atom in atoms]
        graph = cls([sorted(n) for n in neighbors], is_h, set())
        graph.main_chain = _named_backbone(atoms, index)
        for fragment in graph.fragments():
            if not graph.main_chain & set(fragment):
                graph.main_chain |= set(graph.longest_heavy_path(fragment))
        return graph

    def priority(self, atom: int) -> tuple[int, int]:
        """Sort key of placement among siblings: main chain, then heavy atoms, then hydrogens; then index."""
        rank = 0 if atom in self.main_chain else (2 if self.is_hydrogen[atom] else 1)
        return rank, atom

    def fragments(self) -> list[list[int]]:
        """Connected components, largest first (ties: lowest first atom); atoms sorted in each."""
        seen: set[int] = set()
        parts = []
        for start in range(self.n_atoms):
            if start not in seen:
                part = sorted(self.distances(start))
                seen.update(part)
                parts.append(part)
        return sorted(parts, key=lambda p: (-len(p), p[0]))

    def distances(self, start: int) -> dict[int, int]:
        """Bond-count distances from ``start`` to every atom of its fragment."""
        dist, queue = {start: 0}, deque([start])
        while queue:
            atom = queue.popleft()
            for n in self.neighbors[atom]:
                if n not in dist:
                    dist[n] = dist[atom] + 1
                    queue.append(n)
        return dist

    def ring_systems(self, max_atoms: int) -> list[list[int]]:
        """Heavy-atom ring systems of at most ``max_atoms`` atoms (benzene: 6, indole: 9, proline: 5), each
        sorted, ordered by first atom. A ring system is a connected set of bonds that lie on cycles (fused
        rings are one system); larger ones (macrocycles) are left out."""
        heavy = [not h for h in self.is_hydrogen]
        cyclic: list[set[int]] = [set() for _ in range(self.n_atoms)]
        for a in range(self.n_atoms):
            for b in self.neighbors[a]:
                if a < b and heavy[a] and heavy[b] and self._connected_without(a, b, heavy):
                    cyclic[a].add(b)
                    cyclic[b].add(a)
        systems, seen = [], set()
        for start in range(self.n_atoms):
            if cyclic[start] and start not in seen:
                members, queue = {start}, deque([start])
                while queue:
                    for n in cyclic[queue.popleft()] - members:
                        members.add(n)
                        queue.append(n)
                seen |= members
                if len(members) <= max_atoms:
                    systems.append(sorted(members))
        return systems

    def _connected_without(self, a: int, b: int, allowed: list[bool]) -> bool:
        """Whether a reaches b through ``allowed`` atoms without the bond a-b (the bond lies on a cycle)."""
        seen, queue = {a}, deque([a])
        while queue:
            atom = queue.popleft()
            for n in self.neighbors[atom]:
                if n == b and atom != a:
                    return True
                if n not in seen and n != b and allowed[n]:
                    seen.add(n)
                    queue.append(n)
        return False

    def longest_heavy_path(self, fragment) -> list[int]:
        """A longest shortest path between heavy atoms of ``fragment`` (double breadth-first search)."""
        heavy = [a for a in fragment if not self.is_hydrogen[a]] or list(fragment)

        def farthest(start):
            dist = self.distances(start)
            return max(heavy, key=lambda a: (dist[a], -a)), dist

        end_a, _ = farthest(heavy[0])
        end_b, _ = farthest(end_a)
        path, dist = [end_b], self.distances(end_a)
        while path[-1] != end_a:  # walk back along decreasing distance, lowest index first
            path.append(min(n for n in self.neighbors[path[-1]] if dist.get(n) == dist[path[-1]] - 1))
        return path

    def choose_root(self, fragment=None) -> int:
        """The most central main-chain heavy atom of ``fragment`` (default: the largest fragment).

        Centrality is the largest bond-count distance to any heavy atom of the fragment; atoms with at
        least two neighbours are preferred (so that the root and its neighbours span a plane); ties go to
        the lowest index.
        """
        fragment = self.fragments()[0] if fragment is None else list(fragment)
        heavy = [a for a in fragment if not self.is_hydrogen[a]] or list(fragment)
        candidates = [a for a in heavy if a in self.main_chain] or heavy

        def key(atom):
            dist = self.distances(atom)
            return max(dist[h] for h in heavy), len(self.neighbors[atom]) < 2, atom

        return min(candidates, key=key)


def _is_hydrogen(atom) -> bool:
    element = getattr(atom, "element", None)
    symbol = getattr(element, "symbol", None)
    if symbol is not None:
        return symbol == "H"
    return atom.name.upper().startswith("H")


def _named_backbone(atoms, index) -> set[int]:
    main: set[int] = set()
    residues: dict[int, list] = {}
    for atom in atoms:
        residues.setdefault(id(atom.residue), []).append(atom)
    for members in residues.values():
        names = {a.name: index[id(a)] for a in members}
        resname = members[0].residue.name
        if resname in _CAP_NAMES:
            main |= {names[n] for n in _CAP_NAMES[resname] if n in names}
        elif _BACKBONE_NAMES <= names.keys():
            main |= {names[n] for n in _BACKBONE_NAMES}
    return main

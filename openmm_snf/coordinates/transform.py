"""Internal-coordinate flow block: IC vector (bonds, angles, torsions, rigid block) <-> Cartesian positions.

Direction: ``forward`` is the sampling direction, IC -> Cartesian; ``inverse`` is Cartesian -> IC. Both return
``(output, logdet)`` with ``logdet`` (B,) = log|det J| of that direction, and inverse's logdet is minus
forward's at the same point.

IC vector layout (``dim`` entries; slices are attributes):

* ``bond_slice``: bond lengths, standardized ``(r - mean) / std`` if ``normalize`` (else nm);
* ``angle_slice``: bond angles, standardized likewise (else radians, in (0, pi));
* ``torsion_slice``: torsions in radians, never standardized, in [-pi, pi) from ``inverse``; ``forward`` takes
  any real value (periodic). ``periodic_mask`` is True on these entries;
* ``cartesian_slice`` (mixed scheme only): the whitened rigid block (see :mod:`.rigid`);
* ``ring_slices`` (one per ring block, with ``ring_graph``): a ring system's atoms as whitened offsets in
  the frame of three placed atoms, in place of their rows (see :mod:`.rings`; constant logdet).

Schemes and what ``logdet`` means
---------------------------------
``scheme="mixed"`` (default, the SNF paper's): the rigid block (k atoms) gives 3k - 6 whitened coordinates
and each other atom a (bond, angle, torsion) row: dim = 3N - 6 (alanine dipeptide: 9 + 17*3 = 60). ``forward``
returns configurations on a fixed *section* of the rigid motions: the block is Kabsch-aligned to a target
shape T (its centroid at the origin). The *reduced Cartesian coordinates* of such a configuration are the
3k - 6 orthonormal section coordinates z of the block and the 3 (N - k) Cartesian coordinates of the other
atoms. With ``orbit_correction=False`` (the paper's bookkeeping), logdet = log|det d(reduced)/d(ic)| =
Σ log std(bonds, angles) + ½ Σ log λ (whitening) + Σ_rows log(r² sin θ).

``scheme="global"``: all N atoms have rows; the first atom sits at the origin, the second on the +x axis, the
third in the xy-plane (y > 0): dim = 3N - 6. Reduced coordinates are x of atom 2, x and y of atom 3 and all
coordinates of the others; logdet (uncorrected) = Σ log std + log r₃ + Σ_rows≥4 log(r² sin θ).

``inverse`` accepts any pose: the mixed scheme Kabsch-aligns the block onto T (so ICs are invariant under
rigid motions), the global scheme only measures distances and angles. ``inverse(forward(ic)) == ic`` whenever
the alignment's optimum is the identity, which holds for blocks near T (tested for whitened values up to 4).

``orbit_correction=True`` (default) adds log V(x), the volume factor of the 6 removed degrees of freedom, so
that logdet = log|det ∂(x_full)/∂(ic, t, ω)| at t = ω = 0 for the full square 3N x 3N map
(ic, t, ω) -> exp(ω×) forward(ic) + t (translation t in nm, rotation vector ω in radians). Hence, for a
Cartesian density p(x) invariant under rigid motions, the IC density is p(forward(ic)) * exp(logdet) * 8π² V_box:
the corrected logdet makes SNF weights exact for the Boltzmann distribution with rigid motions integrated out,
while the uncorrected one targets the Boltzmann density restricted to the section (differing by V(x), which
depends on the block's internal geometry). Global scheme: V = r₂² r₃ sin θ₃, so the corrected logdet is the
textbook Σ log(r² sin θ); mixed scheme: V = |det(Q^T G(y))| (see :class:`.rigid.RigidBlock`).

Numerical guards (counted in :attr:`statistics`, never NaN): bonds are floored at ``min_bond`` nm, angles
clamped to [``min_angle``, pi - ``min_angle``] for placement and for log sin θ; placements whose torsion
references are (nearly) collinear or coincident (sine of the reference angle below 1e-4) are counted as
degenerate. A clamped sample's logdet is that of the
clamped point, so its weight is not exact: the counters say how often this happened.

Constraints: this transform treats every bond length as a degree of freedom. Systems with constraints are
refused by :meth:`InternalCoordinateTransform.from_system` (build the System with ``constraints=None``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import bond_angles, bond_lengths, dihedrals, place_atoms
from .graph import MolecularGraph
from .rigid import RigidBlock
from .rings import LocalFrameBlock, ring_blocks
from .zmatrix import ZMatrix, find_row

__all__ = ["InternalCoordinateTransform", "stages"]

_COUNTERS = ("clamped_bonds", "clamped_angles", "degenerate_frames")


def stages(rows: np.ndarray, placed: set[int], blocks=()) -> list[tuple[np.ndarray, list[int]]]:
    """Group complete z-matrix rows and ring blocks into stages: each one's references are placed by earlier
    stages (or before the first).

    Args:
        rows: (n_rows, 4) ints; placed: atoms placed before the first stage; blocks: (frame atoms, atoms) of
            the ring blocks (:func:`~.rings.ring_blocks`).
    Returns: per stage, (row indices array, block indices list); every row and block appears once.
    """
    level = {atom: 0 for atom in placed}
    row_level, block_level = [None] * len(rows), [None] * len(blocks)
    while None in row_level or None in block_level:
        progress = False
        for k, row in enumerate(rows):
            if row_level[k] is None and all(int(r) in level for r in row[1:]):
                row_level[k] = level[int(row[0])] = 1 + max(level[int(r)] for r in row[1:])
                progress = True
        for k, (frame_atoms, atoms) in enumerate(blocks):
            if block_level[k] is None and all(a in level for a in frame_atoms):
                block_level[k] = 1 + max(level[a] for a in frame_atoms)
                level.update({a: block_level[k] for a in atoms})
                progress = True
        if not progress:
            raise ValueError("z-matrix rows or ring blocks reference atoms that are never placed")
    row_level = np.asarray(row_level, dtype=np.int64)
    depth = max([int(row_level.max(initial=0))] + block_level)
    return [(np.flatnonzero(row_level == k), [b for b, lv in enumerate(block_level) if lv == k])
            for k in range(1, depth + 1)]


class InternalCoordinateTransform(torch.nn.Module):
    """Flow block IC (B, dim) <-> Cartesian (B, n_atoms, 3) nm; see the module docs for the exact logdet.

    Args:
        zmatrix: a :class:`ZMatrix` (e.g. ``ZMatrix.from_topology(topology)``) usable by ``scheme``.
        reference: (n_frames, n_atoms, 3) nm (tensor or array), e.g. MD frames; gives the standardization
            statistics (needs >= 2 frames, and >= 3k - 5 for the whitened block) and the block's target shape.
        scheme: "mixed" or "global".
        normalize: standardize bonds and angles and whiten the rigid block with ``reference`` statistics.
        orbit_correction: include the rigid-motion volume factor in logdet (see the module docs).
        min_bond: nm, floor of bond lengths; min_angle: radians, margin of angles from 0 and pi.
        ring_graph: the molecule's bond graph, to place its small ring systems in local frames (:mod:`.rings`);
            None: every atom by its row.
    """

    def __init__(self, zmatrix: ZMatrix, reference, *, scheme: str = "mixed", normalize: bool = True,
                 orbit_correction: bool = True, min_bond: float = 1e-3, min_angle: float = 1e-5,
                 ring_graph: MolecularGraph | None = None):
        super().__init__()
        if scheme not in ("mixed", "global"):
            raise ValueError(f"scheme must be 'mixed' or 'global', got {scheme!r}")
        zmatrix.require(scheme)
        reference = torch.as_tensor(np.asarray(reference) if not torch.is_tensor(reference) else reference)
        reference = reference.detach().to("cpu", torch.float64)
        if reference.ndim == 2:
            reference = reference[None]
        if reference.shape[1:] != (zmatrix.n_atoms, 3) or not torch.isfinite(reference).all():
            raise ValueError(f"reference must be finite (n_frames, {zmatrix.n_atoms}, 3) nm, got shape "
                             f"{tuple(reference.shape)}")
        self.zmatrix, self.scheme = zmatrix, scheme
        self.n_atoms = zmatrix.n_atoms
        self.orbit_correction, self.min_bond, self.min_angle = orbit_correction, min_bond, min_angle
        rows = zmatrix.rows_for(scheme)
        first = 3 if scheme == "global" else 0  # rows of the global scheme's head, placed before the others
        blocks = [] if ring_graph is None else ring_blocks(
            ring_graph, rows[first:], rows[:first, 0].tolist() if first else zmatrix.rigid.tolist())
        rows = rows[~np.isin(rows[:, 0], [a for _, atoms in blocks for a in atoms])]
        self._scheme_rows = rows
        if scheme == "global":
            self._head = [int(rows[0, 0]), int(rows[1, 0]), int(rows[2, 0])]
            self._third_on_second = int(rows[2, 1]) == self._head[1]  # atom 3 bonded to atom 2 (else to atom 1)
            self.register_buffer("_head_rows", torch.as_tensor(rows[:3], dtype=torch.long), persistent=False)
            rows, placed = rows[3:], set(self._head)
        else:
            placed = set(zmatrix.rigid.tolist())
            self.register_buffer("_rigid_atoms", torch.as_tensor(zmatrix.rigid), persistent=False)
        self.register_buffer("_rows", torch.as_tensor(rows, dtype=torch.long), persistent=False)
        self._stages = stages(rows, placed, blocks)
        for k, (stage, _) in enumerate(self._stages):
            self.register_buffer(f"_stage{k}", torch.as_tensor(stage, dtype=torch.long), persistent=False)
        n_rows, n_head = len(rows), (0 if scheme == "mixed" else 1)
        self.n_bonds, self.n_angles, self.n_torsions = n_rows + 2 * n_head, n_rows + n_head, n_rows
        self.bond_slice = slice(0, self.n_bonds)
        self.angle_slice = slice(self.bond_slice.stop, self.bond_slice.stop + self.n_angles)
        self.torsion_slice = slice(self.angle_slice.stop, self.angle_slice.stop + self.n_torsions)
        self.rigid = (RigidBlock(reference[:, zmatrix.rigid], whiten=normalize) if scheme == "mixed" else None)
        self.cartesian_slice = slice(self.torsion_slice.stop,
                                     self.torsion_slice.stop + (self.rigid.dim if self.rigid else 0))
        self.ring_blocks = torch.nn.ModuleList(LocalFrameBlock(frame, atoms, reference, whiten=normalize)
                                               for frame, atoms in blocks)
        self.ring_slices = []
        for block in self.ring_blocks:
            start = self.ring_slices[-1].stop if self.ring_slices else self.cartesian_slice.stop
            self.ring_slices.append(slice(start, start + block.dim))
        self.dim = self.ring_slices[-1].stop if self.ring_slices else self.cartesian_slice.stop
        periodic = torch.zeros(self.dim, dtype=torch.bool)
        periodic[self.torsion_slice] = True
        self.register_buffer("periodic_mask", periodic, persistent=False)
        self.register_buffer("_counts", torch.zeros(len(_COUNTERS), dtype=torch.long), persistent=False)
        self._set_statistics(reference, normalize)

    @classmethod
    def from_system(cls, molecular_system, reference, *, rings: bool = True, **kwargs) -> "InternalCoordinateTransform":
        """Build from a :class:`~openmm_snf.systems.MolecularSystem` (z-matrix from its topology; with ``rings``,
        its ring systems in local frames, :mod:`.rings`).

        Raises ValueError if the System has constraints (their bond lengths would not be free coordinates).
        """
        pairs = molecular_system.constrained_pairs
        if pairs:
            raise ValueError(f"{molecular_system.name}: the System constrains {len(pairs)} distance(s) (e.g. atoms "
                             f"{pairs[0]}); internal-coordinate flows treat every bond as free. Rebuild the System "
                             "with constraints=None (load_system builds PDB systems that way)")
        graph = MolecularGraph.from_topology(molecular_system.topology)
        return cls(ZMatrix.from_graph(graph), reference, ring_graph=graph if rings else None, **kwargs)

    # ------------------------------------------------------------------ statistics
    def _set_statistics(self, reference: torch.Tensor, normalize: bool) -> None:
        bonds, angles, _ = self._measure(reference)
        if normalize:
            if reference.shape[0] < 2:
                raise ValueError("normalize=True needs at least 2 reference frames (use MD frames), or pass "
                                 "normalize=False")
            std_b, std_a = bonds.std(0), angles.std(0)
            if (std_b <= 0).any() or (std_a <= 0).any():
                raise ValueError("some bond lengths or angles do not vary over the reference frames; "
                                 "give more, or more varied, frames (or normalize=False)")
            stats = (bonds.mean(0), std_b, angles.mean(0), std_a)
        else:
            stats = (torch.zeros(self.n_bonds, dtype=torch.float64), torch.ones(self.n_bonds, dtype=torch.float64),
                     torch.zeros(self.n_angles, dtype=torch.float64), torch.ones(self.n_angles, dtype=torch.float64))
        for name, value in zip(("bond_mean", "bond_std", "angle_mean", "angle_std"), stats):
            self.register_buffer(name, value)
        # a buffer, so that load_state_dict keeps it consistent with the statistics it loads
        log_scale = (stats[1].log().sum() + stats[3].log().sum() + (self.rigid.log_scale if self.rigid else 0.0)
                     + sum(block.log_scale for block in self.ring_blocks))
        self.register_buffer("log_scale", log_scale.reshape(()))

    @property
    def statistics(self) -> dict[str, int]:
        """Counts of clamped bonds, clamped angles and degenerate placements since construction/reset."""
        return dict(zip(_COUNTERS, self._counts.tolist()))

    def reset_statistics(self) -> None:
        self._counts.zero_()

    # ------------------------------------------------------------------ accessors
    def bonds(self, ic: torch.Tensor) -> torch.Tensor:
        """Bond lengths in nm (B, n_bonds) from an IC batch."""
        return self.bond_mean.to(ic) + ic[:, self.bond_slice] * self.bond_std.to(ic)

    def angles(self, ic: torch.Tensor) -> torch.Tensor:
        """Bond angles in radians (B, n_angles) from an IC batch."""
        return self.angle_mean.to(ic) + ic[:, self.angle_slice] * self.angle_std.to(ic)

    def torsions(self, ic: torch.Tensor) -> torch.Tensor:
        """Torsions in radians (B, n_torsions) from an IC batch."""
        return ic[:, self.torsion_slice]

    def atoms_of(self, kind: str) -> np.ndarray:
        """Atom indices of each IC entry of a kind: "bonds" (n, 2), "angles" (n, 3), "torsions" (n, 4)."""
        width = {"bonds": 2, "angles": 3, "torsions": 4}[kind]
        rows = self._scheme_rows
        start = {"bonds": 1, "angles": 2, "torsions": 3}[kind] if self.scheme == "global" else 0
        return rows[start:, :width].copy()

    def torsion_index(self, atoms) -> int:
        """Position in the IC vector of the torsion of ``atoms`` (either order); KeyError if it is not one."""
        row = find_row(self._scheme_rows, atoms)
        if row is None:
            raise KeyError(f"dihedral {list(atoms)} is not a torsion of this z-matrix")
        return self.torsion_slice.start + row - (3 if self.scheme == "global" else 0)

    def extra_repr(self) -> str:
        return (f"n_atoms={self.n_atoms}, dim={self.dim}, scheme={self.scheme!r}, "
                f"orbit_correction={self.orbit_correction}, ring_blocks={len(self.ring_blocks)}")

    # ------------------------------------------------------------------ the block
    def forward(self, ic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IC (B, dim) -> (Cartesian (B, n_atoms, 3) nm on the section, logdet (B,)); staged NeRF placement."""
        ic = self._check(ic, (self.dim,), "ic")
        bonds, angles = self._clamped(self.bonds(ic), self.angles(ic))
        torsions = self.torsions(ic)
        x = ic.new_zeros(ic.shape[0], self.n_atoms, 3)
        aligned = None
        if self.scheme == "mixed":
            aligned = self.rigid.to_cartesian(ic[:, self.cartesian_slice])
            x = x.index_copy(1, self._rigid_atoms, aligned)
            row_bonds, row_angles = bonds, angles
        else:
            x = self._place_head(x, bonds[:, :2], angles[:, 0])
            row_bonds, row_angles = bonds[:, 2:], angles[:, 1:]
        eps = 10 * torch.finfo(ic.dtype).eps
        for k, (_, blocks) in enumerate(self._stages):
            stage = getattr(self, f"_stage{k}")
            if len(stage):
                rows = self._rows[stage]
                # index_select, not x[:, idx]: several times faster on CPU
                positions, degenerate = place_atoms(*(x.index_select(1, rows[:, j]) for j in (1, 2, 3)),
                                                    *(t.index_select(1, stage) for t in (row_bonds, row_angles,
                                                                                         torsions)), eps)
                self._count(2, degenerate)
                x = x.index_copy(1, rows[:, 0], positions)
            for b in blocks:
                block = self.ring_blocks[b]
                x = x.index_copy(1, block.atoms, block.to_cartesian(ic[:, self.ring_slices[b]], x))
        return x, self._log_det(bonds, angles, aligned)

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cartesian (B, n_atoms, 3) nm, any pose -> (IC (B, dim), logdet (B,) = -forward's at that point)."""
        x = self._check(x, (self.n_atoms, 3), "x")
        bonds, angles, torsions = self._measure(x)
        parts = [(bonds - self.bond_mean.to(x)) / self.bond_std.to(x),
                 (angles - self.angle_mean.to(x)) / self.angle_std.to(x), torsions]
        aligned = None
        if self.scheme == "mixed":
            w, aligned = self.rigid.from_cartesian(x.index_select(1, self._rigid_atoms))
            parts.append(w)
        parts += [block.from_cartesian(x) for block in self.ring_blocks]
        clamped_bonds, clamped_angles = self._clamped(bonds, angles)
        return torch.cat(parts, dim=-1), -self._log_det(clamped_bonds, clamped_angles, aligned)

    # ------------------------------------------------------------------ internals
    def _measure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Physical bonds (B, n_bonds) nm, angles (B, n_angles) rad, torsions (B, n_torsions) rad of x."""
        a, b, c, d = (x.index_select(1, self._rows[:, k]) for k in range(4))
        bonds, angles, torsions = bond_lengths(a, b), bond_angles(a, b, c), dihedrals(a, b, c, d)
        if self.scheme == "global":
            head = self._head_rows
            r2 = bond_lengths(x[:, head[1, 0]], x[:, head[1, 1]])
            r3 = bond_lengths(x[:, head[2, 0]], x[:, head[2, 1]])
            theta3 = bond_angles(x[:, head[2, 0]], x[:, head[2, 1]], x[:, head[2, 2]])
            bonds = torch.cat([r2[:, None], r3[:, None], bonds], dim=-1)
            angles = torch.cat([theta3[:, None], angles], dim=-1)
        return bonds, angles, torsions

    def _place_head(self, x: torch.Tensor, bonds: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Global scheme: atom 1 at the origin, atom 2 at (r2, 0, 0), atom 3 in the xy-plane with y > 0."""
        r2, r3 = bonds[:, 0], bonds[:, 1]
        zero = torch.zeros_like(r2)
        base, direction = (r2, 1.0) if self._third_on_second else (zero, -1.0)
        third = torch.stack([base - direction * r3 * torch.cos(angle), r3 * torch.sin(angle), zero], dim=-1)
        head = torch.stack([torch.zeros_like(third), torch.stack([r2, zero, zero], dim=-1), third], dim=1)
        return x.index_copy(1, self._head_rows[:, 0], head)

    def _log_det(self, bonds: torch.Tensor, angles: torch.Tensor, aligned: torch.Tensor | None) -> torch.Tensor:
        """Forward log|det| from (clamped) physical bonds and angles and, for the mixed scheme, the block."""
        n_head = 0 if self.scheme == "mixed" else 1
        row_bonds, row_angles = bonds[:, 2 * n_head:], angles[:, n_head:]
        logdet = self.log_scale.to(bonds) + (2 * row_bonds.log() + row_angles.sin().log()).sum(-1)
        if self.scheme == "global":
            r2, r3, theta3 = bonds[:, 0], bonds[:, 1], angles[:, 0]
            logdet = logdet + r3.log()
            if self.orbit_correction:
                logdet = logdet + 2 * r2.log() + r3.log() + theta3.sin().log()
        elif self.orbit_correction:
            logdet = logdet + self.rigid.log_orbit_volume(aligned)
        return logdet

    def _clamped(self, bonds: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._count(0, bonds < self.min_bond)
        self._count(1, (angles < self.min_angle) | (angles > math.pi - self.min_angle))
        return bonds.clamp_min(self.min_bond), angles.clamp(self.min_angle, math.pi - self.min_angle)

    def _count(self, which: int, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self._counts[which] += mask.sum()

    def _check(self, tensor: torch.Tensor, tail: tuple, name: str) -> torch.Tensor:
        if not torch.is_tensor(tensor) or tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be a float32 or float64 torch tensor, got {type(tensor).__name__} "
                            f"{getattr(tensor, 'dtype', '')}")
        if tensor.ndim != 1 + len(tail) or tuple(tensor.shape[1:]) != tail:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, tail))}), got {tuple(tensor.shape)}")
        return tensor

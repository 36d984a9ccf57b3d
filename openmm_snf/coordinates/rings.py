"""Ring systems in local Cartesian frames: a ring's atoms as whitened offsets from three placed atoms.

A z-matrix places a ring atom by a bond, an angle and a torsion, and the bond that closes the ring is no
coordinate at all: its length follows from the ring's other coordinates, so these must be learned jointly to
thermal precision (~0.003 nm for a C-C bond at 300 K). Measured on ACE-ALA-SER-PHE-NME (OBC2, 300 K MD):
giving one phenyl atom's (bond, angle, torsion) the value of another frame costs 6-19 kT of bond energy, all
of it in the closing bond. In a local frame the ring's fluctuations are small, nearly Gaussian and linearly
correlated, and a whitening from reference frames removes the correlation before the flow sees them.

For a ring system S (heavy atoms on rings, fused rings as one system, plus the hydrogens bonded to them):
the frame atoms are (o, u, v), o and u the first two heavy atoms of S placed, v the angle reference of u's
z-matrix row (u's bond reference is o). Every other atom a of S sits at

    x_a = x_o + R y_a,   R = [e1, e2, e3],  e1 = unit(x_u - x_o),  e3 = unit(e1 x (x_v - x_o)),  e2 = e3 x e1,

and the block's 3m offsets y are whitened by principal components of the reference frames:
y = mean + scale @ w. For fixed frame atoms, w -> x is affine with a rotation, so the block's
log|det| = ½ Σ log λ is a constant: no ring coordinate enters the Jacobian.
"""
from __future__ import annotations

import numpy as np
import torch

from .rigid import pca_whitening

__all__ = ["LocalFrameBlock", "ring_blocks", "MAX_RING_ATOMS"]

#: ring systems with more heavy atoms than this (macrocycles, cyclic peptides) keep their z-matrix rows:
#: they are flexible, not the small, nearly rigid rings a linear whitening describes (indole has 9)
MAX_RING_ATOMS = 10


def ring_blocks(graph, rows: np.ndarray, placed) -> list[tuple[tuple[int, int, int], list[int]]]:
    """(frame atoms (o, u, v), block atoms) of each ring system of ``graph`` that can be placed in a frame.

    Args:
        graph: a :class:`~openmm_snf.coordinates.graph.MolecularGraph`.
        rows: (n, 4) z-matrix rows in placement order (the scheme's rows, without atoms placed otherwise).
        placed: atoms placed before the rows (the mixed scheme's rigid block, the global scheme's head).

    A ring system is left to its rows when one of its atoms other than o and u is placed otherwise (e.g. a
    proline whose ring holds the root), or when u's row does not start from o.
    """
    placed = list(placed)
    row_of = {int(row[0]): row for row in rows}
    position = {atom: k for k, atom in enumerate(placed + [int(r[0]) for r in rows])}
    blocks = []
    for system in graph.ring_systems(MAX_RING_ATOMS):
        heavy = sorted(system, key=position.__getitem__)
        o, u = heavy[0], heavy[1]
        members = heavy[2:] + sorted(n for a in system for n in graph.neighbors[a] if graph.is_hydrogen[n])
        if u not in row_of or int(row_of[u][1]) != o or any(a not in row_of for a in members):
            continue
        v = int(row_of[u][2])
        if v not in members:
            blocks.append(((o, u, v), sorted(members, key=position.__getitem__)))
    return blocks


def _frame(o: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotation (B, 3, 3) whose columns are the local axes of frame atoms (B, 3) positions o, u, v."""
    eps = 10 * torch.finfo(o.dtype).eps
    e1 = u - o
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(eps)
    e3 = torch.linalg.cross(e1, v - o)
    e3 = e3 / e3.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.stack([e1, torch.linalg.cross(e3, e1), e3], dim=-1)


class LocalFrameBlock(torch.nn.Module):
    """The atoms of one ring system as 3m whitened offsets in the frame of three placed atoms.

    Args:
        frame_atoms: (o, u, v) atom indices; atoms: the m block atoms.
        reference: (n_frames, n_atoms, 3) float64 positions, nm.
        whiten: if False, w = y (offsets in nm; one frame suffices).

    Attributes:
        dim: 3m; log_scale: ½ Σ log λ of the whitening (0 if not whitened).
    """

    def __init__(self, frame_atoms, atoms, reference: torch.Tensor, *, whiten: bool = True):
        super().__init__()
        self.frame_atoms = tuple(int(a) for a in frame_atoms)  # python ints: no device sync per pass
        self.register_buffer("atoms", torch.as_tensor(list(atoms), dtype=torch.long), persistent=False)
        self.dim = 3 * len(atoms)
        mean, scale, inverse_scale, log_scale = pca_whitening(self._offsets(reference.to(torch.float64)), whiten,
                                                              f"the {len(atoms)} atoms of a ring block")
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.register_buffer("inverse_scale", inverse_scale)
        self.register_buffer("log_scale", log_scale.reshape(()))

    def _offsets(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3m) local offsets of the block atoms of positions x (B, n_atoms, 3)."""
        o, u, v = (x[:, a] for a in self.frame_atoms)
        return ((x.index_select(1, self.atoms) - o[:, None]) @ _frame(o, u, v)).reshape(len(x), -1)

    def to_cartesian(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, m, 3) positions of the block atoms from w (B, 3m), the frame atoms taken from x (B, n_atoms, 3)."""
        o, u, v = (x[:, a] for a in self.frame_atoms)
        y = (self.mean.to(w) + w @ self.scale.to(w).T).reshape(len(w), -1, 3)
        return o[:, None] + y @ _frame(o, u, v).transpose(-1, -2)

    def from_cartesian(self, x: torch.Tensor) -> torch.Tensor:
        """w (B, 3m) of positions x (B, n_atoms, 3), any pose."""
        return (self._offsets(x) - self.mean.to(x)) @ self.inverse_scale.to(x).T

"""Batched torch geometry: bond lengths, angles, dihedrals, atom placement (NeRF), Kabsch alignment.

All functions take and return tensors of the caller's dtype and device. Points are (..., 3) in nm;
angles in radians. Dihedrals follow the IUPAC / mdtraj convention (``mdtraj.compute_dihedrals``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["bond_lengths", "bond_angles", "dihedrals", "place_atoms", "kabsch_align", "skew"]


def _unit(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def bond_lengths(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| for (..., 3) points -> (...)."""
    return (a - b).norm(dim=-1)


def bond_angles(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angle a-b-c at b, in [0, pi] -> (...). atan2 form: accurate near 0 and pi, finite for coincident atoms."""
    u, v = a - b, c - b
    return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1))


def dihedrals(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Dihedral a-b-c-d in [-pi, pi) -> (...), same sign convention as mdtraj."""
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    y = (b1 * n2).sum(-1) * b2.norm(dim=-1)
    x = (n1 * n2).sum(-1)
    phi = torch.atan2(y, x)
    return torch.where(phi >= math.pi, phi - 2 * math.pi, phi)


def place_atoms(b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, bond: torch.Tensor, angle: torch.Tensor,
                torsion: torch.Tensor, eps: float, degenerate_sin: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions a with |a-b| = bond, angle a-b-c = angle, dihedral a-b-c-d = torsion (NeRF).

    Args:
        b, c, d: (..., 3) reference positions; bond, angle, torsion: (...).
        eps: floor of the norms used to build the local frame (coincident or collinear references).
        degenerate_sin: a frame counts as degenerate where the sine of the angle between c - d and b - c
            is below this (the torsion is then ill-conditioned).

    Returns:
        a: (..., 3); degenerate: (...) bool, True where b, c, d are (nearly) collinear or coincident, so
        that the torsion is ill-defined (exactly collinear: the atom is placed as if the torsion were 0 or pi).

    For fixed b, c, d the map (bond, angle, torsion) -> a is spherical coordinates about b with polar axis
    c - b, so |det d a / d(bond, angle, torsion)| = bond**2 * sin(angle).
    """
    axis = _unit(b - c, eps)
    normal = torch.linalg.cross(c - d, axis)
    normal_norm = normal.norm(dim=-1, keepdim=True)
    degenerate = normal_norm.squeeze(-1) < degenerate_sin * (c - d).norm(dim=-1).clamp_min(eps)
    normal = normal / normal_norm.clamp_min(eps)
    in_plane = torch.linalg.cross(normal, axis)
    sin_angle = torch.sin(angle)
    local = (-torch.cos(angle)[..., None] * axis
             + (sin_angle * torch.cos(torsion))[..., None] * in_plane
             + (sin_angle * torch.sin(torsion))[..., None] * normal)
    return b + bond[..., None] * local, degenerate


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices: skew(v) @ w = v x w; (..., 3) -> (..., 3, 3)."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack([torch.stack([zero, -z, y], -1),
                        torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], -2)


def kabsch_align(points: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rigidly move each configuration of ``points`` onto ``target`` (least squares, proper rotations).

    Args:
        points: (B, k, 3); target: (k, 3), centred at the origin.

    Returns:
        (B, k, 3): R (p - centroid(p)) for the rotation R minimizing the squared distance to ``target``.
        The result y satisfies sum_i (y_i - t_i) = 0 and sum_i t_i x y_i = 0 (stationarity), i.e. y - target is
        orthogonal to the rigid-motion directions at ``target``.
    """
    centred = points - points.mean(dim=-2, keepdim=True)
    cov = centred.transpose(-1, -2) @ target  # (B, 3, 3) = sum_i p_i t_i^T
    u, _, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    flip = torch.ones_like(cov[..., 0])
    flip = torch.cat([flip[..., :2], sign[..., None]], dim=-1)
    rotation = vh.transpose(-1, -2) @ (flip[..., None] * u.transpose(-1, -2))  # R = V diag(1,1,s) U^T
    return centred @ rotation.transpose(-1, -2)

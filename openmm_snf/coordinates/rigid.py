"""The Cartesian block of the mixed scheme: aligned, rigid-motion directions removed, PCA-whitened.

For a block of k atoms (alanine dipeptide: 5), the 3k Cartesian coordinates hold 6 rigid-body degrees of
freedom. They are removed exactly, not by dropping the 6 smallest principal components:

* every configuration is rigidly moved (Kabsch) onto a fixed centred target shape T (the Procrustes mean of
  the reference frames). The aligned block y satisfies y - T ⟂ span G(T), where G(T) (3k x 6) holds the
  translation and rotation directions at T. So the aligned blocks fill the (3k-6)-dim affine *section*
  S = T + span(Bs), Bs (3k x (3k-6)) an orthonormal basis of the complement of span G(T);
* z = Bs^T vec(y - T) are orthonormal coordinates on S; whitening gives w = Λ^{-1/2} E^T (z - m) with the
  mean m and the eigen-decomposition E Λ E^T of the covariance of z over the reference frames.

The map w -> y is affine with log|det dz/dw| = ½ Σ log λ. :meth:`RigidBlock.log_orbit_volume` gives the
factor that turns a density on S into the density of the rigid-motion orbits (see the transform's docs).
"""
from __future__ import annotations

import torch

from .geometry import kabsch_align, skew

__all__ = ["RigidBlock", "pca_whitening"]


def rigid_motion_directions(points: torch.Tensor) -> torch.Tensor:
    """(k, 3) points -> (3k, 6): translations along x, y, z, then rotations about x, y, z (about the origin)."""
    k = points.shape[0]
    translations = torch.eye(3, dtype=points.dtype).repeat(k, 1)           # (3k, 3)
    rotations = (-skew(points)).reshape(3 * k, 3)                            # e_j x p_i = -[p_i]x e_j
    return torch.cat([translations, rotations], dim=1)


def pca_whitening(z: torch.Tensor, whiten: bool, what: str):
    """(mean, scale, inverse_scale, log_scale) of the whitening z = mean + scale @ w, w = inverse_scale @ (z - mean)
    of float64 samples z (n, d) by their principal components, log_scale = log|det dz/dw| = ½ Σ log λ (a 0-dim
    tensor); with ``whiten`` False the identity. Raises ValueError naming ``what`` for too few or too uniform samples."""
    n, dim = z.shape
    if not whiten:
        return (torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64),
                torch.eye(dim, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    if n < dim + 1:
        raise ValueError(f"whitening {what} needs at least {dim + 1} reference frames, got {n}")
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(z.T).reshape(dim, dim))
    if eigenvalues.min() <= 1e-12 * max(eigenvalues.max().item(), 1e-300):
        raise ValueError(f"the reference frames do not vary in every internal direction of {what} (singular "
                         "covariance); give more, or more varied, frames")
    return (z.mean(0), eigenvectors * eigenvalues.sqrt(), eigenvectors.T / eigenvalues.sqrt()[:, None],
            0.5 * eigenvalues.log().sum())


class RigidBlock(torch.nn.Module):
    """Whitened Cartesian coordinates of k >= 3 atoms with the 6 rigid-body directions removed.

    Args:
        frames: (n_frames, k, 3) float64 tensor, nm, the block's atoms in the reference frames.
        whiten: if False, w = z (orthonormal section coordinates, no data statistics; one frame suffices).
        procrustes_iterations: rounds of aligning to the running mean shape.

    Attributes:
        dim: 3k - 6.
        log_scale: float, log|det dz/dw| = ½ Σ log λ (0 if not whitened).
    """

    def __init__(self, frames: torch.Tensor, *, whiten: bool = True, procrustes_iterations: int = 10):
        super().__init__()
        frames = frames.to(torch.float64)
        n_frames, k, _ = frames.shape
        target = frames[0] - frames[0].mean(0)
        for _ in range(procrustes_iterations):
            aligned = kabsch_align(frames, target).mean(0)
            target = aligned - aligned.mean(0)
        directions = rigid_motion_directions(target)
        q_full, r = torch.linalg.qr(directions, mode="complete")
        if torch.abs(torch.diagonal(r)).min() < 1e-6 * torch.abs(torch.diagonal(r)).max():
            raise ValueError("the rigid block's atoms are (nearly) collinear: 6 rigid-body directions are not "
                             "defined; choose a block of at least 3 non-collinear atoms")
        section_basis = q_full[:, 6:]
        z = (kabsch_align(frames, target) - target).reshape(n_frames, 3 * k) @ section_basis
        mean, scale, inverse_scale, log_scale = pca_whitening(z, whiten, f"the {k}-atom rigid block")
        self.log_scale = float(log_scale)
        self.dim = 3 * k - 6
        self.register_buffer("target", target)
        self.register_buffer("section_basis", section_basis)
        self.register_buffer("motion_basis", q_full[:, :6])
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.register_buffer("inverse_scale", inverse_scale)

    def to_cartesian(self, w: torch.Tensor) -> torch.Tensor:
        """(B, 3k-6) whitened coordinates -> (B, k, 3) block positions on the section S."""
        z = self.mean.to(w) + w @ self.scale.to(w).T
        return self.target.to(w) + (z @ self.section_basis.to(w).T).reshape(w.shape[0], -1, 3)

    def from_cartesian(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, 3) block positions (any pose) -> (w (B, 3k-6), aligned block (B, k, 3) on S)."""
        target = self.target.to(points)
        aligned = kabsch_align(points, target)
        z = (aligned - target).reshape(points.shape[0], -1) @ self.section_basis.to(points)
        return (z - self.mean.to(points)) @ self.inverse_scale.to(points).T, aligned

    def log_orbit_volume(self, aligned: torch.Tensor) -> torch.Tensor:
        """log|det(Q^T G(y))| for blocks y on S -> (B,); Q = orthonormal basis of span G(T).

        This is the volume factor of the map (s in S, rigid motion g) -> g s at g = identity, with translations
        in nm and rotations in radians (rotation-vector coordinates, i.e. Haar measure normalized to 8 pi^2).
        """
        q = self.motion_basis.to(aligned).reshape(-1, 3, 6)                 # (k, 3, 6)
        translation = q.sum(0).T.expand(aligned.shape[0], 6, 3)             # (B, 6, 3)
        rotation = torch.einsum("kai,bkaj->bij", q, -skew(aligned))         # (B, 6, 3)
        return torch.linalg.slogdet(torch.cat([translation, rotation], dim=-1))[1]

"""Internal coordinates: z-matrix from a topology, and the IC <-> Cartesian flow block.

Typical use (``frames``: (n_frames, n_atoms, 3) nm MD frames)::

    from openmm_snf.coordinates import InternalCoordinateTransform
    transform = InternalCoordinateTransform.from_system(molecular_system, frames)   # mixed scheme
    ic, logdet = transform.inverse(torch.as_tensor(frames))      # Cartesian -> IC (B, transform.dim)
    x, logdet = transform.forward(ic)                            # IC -> Cartesian, the sampling direction
    phi = ic[:, transform.torsion_index([4, 6, 8, 14])]          # backbone torsions are IC entries

See :mod:`.transform` for the exact meaning of ``logdet`` and :class:`.ZMatrix` for user z-matrices.
"""
from .transform import InternalCoordinateTransform
from .zmatrix import ZMatrix, ZMatrixError

__all__ = ["InternalCoordinateTransform", "ZMatrix", "ZMatrixError"]

"""Internal coordinates: z-matrix from a topology, and the IC <-> Cartesian flow block."""
from .transform import InternalCoordinateTransform
from .zmatrix import ZMatrix, ZMatrixError

__all__ = ["InternalCoordinateTransform", "ZMatrix", "ZMatrixError"]

"""openmm-snf: Stochastic Normalizing Flows for OpenMM systems."""
from .systems import MolecularSystem, SystemLoadError, load_system, shipped_systems

__version__ = "0.1.0"
__all__ = ["MolecularSystem", "SystemLoadError", "load_system", "shipped_systems", "__version__"]

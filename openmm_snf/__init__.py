"""openmm-snf: Stochastic Normalizing Flows for OpenMM systems.

The top-level API (see :mod:`openmm_snf.api`): ``load_system`` -> ``train`` -> ``sample`` -> ``free_energy``.
"""
__version__ = "0.1.0"

from .systems import MolecularSystem, SystemLoadError, load_system, shipped_systems  # noqa: E402
# Imported last: ``train`` (the function) takes the name the submodule openmm_snf.train got while loading;
# ``from openmm_snf.train import Trainer`` still reaches the module.
from .api import free_energy, sample, train  # noqa: E402

__all__ = ["MolecularSystem", "SystemLoadError", "load_system", "shipped_systems", "train", "sample",
           "free_energy", "__version__"]

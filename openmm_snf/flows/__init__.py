"""Flow blocks, stochastic blocks and the SNF sequence (see :mod:`openmm_snf.flows.base`)."""
from .anneal import AnnealingStages, annealed
from .augment import MarginalizeAuxiliary
from .base import Block, Energy, FlowBlock, InverseBlock, push_forward, wrap_angle
from .builder import PAPER_ALANINE_DIPEPTIDE, PAPER_DOUBLE_WELL, build_snf, build_snf_from_config
from .couplings import MLP, AffineCoupling, SplineCoupling
from .elementwise import ActNorm, Permute, Reshape
from .energies import (DoubleWellEnergy, GaussianEnergy, InterpolatedEnergy, PulledBackEnergy,
                       energy_and_gradient)
from .priors import Prior
from .snf import SNF, SNFSample
from .splines import rq_spline
from .stochastic import MALABlock, MetropolisBlock, OverdampedLangevinBlock, UnderdampedLangevinBlock

__all__ = ["Block", "Energy", "FlowBlock", "InverseBlock", "push_forward", "wrap_angle", "Prior", "MLP",
           "AffineCoupling", "SplineCoupling", "ActNorm", "Permute", "Reshape", "MarginalizeAuxiliary", "MALABlock", "MetropolisBlock",
           "OverdampedLangevinBlock", "UnderdampedLangevinBlock", "PulledBackEnergy",
           "InterpolatedEnergy", "GaussianEnergy", "DoubleWellEnergy", "energy_and_gradient", "SNF",
           "SNFSample", "build_snf", "build_snf_from_config", "rq_spline", "PAPER_ALANINE_DIPEPTIDE",
           "PAPER_DOUBLE_WELL", "AnnealingStages", "annealed"]

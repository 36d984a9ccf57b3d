"""Analysis of (weighted) trajectories: CVs, states, free energies with bootstrap intervals, profiles, plots.

Plots live in :mod:`openmm_snf.analysis.plots` (imported on demand, it loads matplotlib).
"""
from .cvs import compute_cv, compute_cvs, known_cv_names, parse_cv_definition, parse_cv_spec
from .diagnostics import StateDiagnostic, Verdict, default_states, diagnose
from .errors import AnalysisError, CVError, EmptyStateError, StateError
from .free_energy import FreeEnergyResult, free_energy_difference, pymbar_exp_delta_f, state_free_energy
from .profiles import FreeEnergyProfile, free_energy_profile, histogram_kl_divergence
from .states import State, parse_state

__all__ = ["compute_cv", "compute_cvs", "known_cv_names", "parse_cv_definition", "parse_cv_spec",
           "StateDiagnostic", "Verdict", "default_states", "diagnose", "AnalysisError", "CVError", "EmptyStateError", "StateError",
           "FreeEnergyResult", "free_energy_difference", "pymbar_exp_delta_f", "state_free_energy",
           "FreeEnergyProfile", "free_energy_profile", "histogram_kl_divergence", "State", "parse_state"]

"""Exceptions of the analysis package; each message names the CV, state or file and what to change."""
from __future__ import annotations

__all__ = ["AnalysisError", "CVError", "StateError", "EmptyStateError"]


class AnalysisError(ValueError):
    """Base class of the errors raised by :mod:`openmm_snf.analysis`."""


class CVError(AnalysisError):
    """A collective variable is unknown or its definition is invalid (the message lists the known ones)."""


class StateError(AnalysisError):
    """A state definition such as ``"A: phi < 0"`` could not be parsed."""


class EmptyStateError(AnalysisError):
    """A state holds no samples, so its free energy is undefined; ``verdict`` (if given) says what to do."""

    def __init__(self, message: str, verdict=None):
        super().__init__(message)
        self.verdict = verdict

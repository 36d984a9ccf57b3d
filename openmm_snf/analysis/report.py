"""The plots of a run: training curves, log-weight histogram, Ramachandran maps and a free-energy profile.

Reads only files: the run folder's ``metrics.jsonl`` and (when the run made it) ``data.dcd`` as the
reference MD, and a weighted sample DCD with its sidecar. Which plots are drawn depends on what the
molecule has: phi/psi (Ramachandran + phi profile) or the first CV of its metadata (a 1-D profile).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import read_trajectory, read_weighted_trajectory
from ..weights import normalized_weights
from . import plots
from .cvs import compute_cv
from .errors import CVError
from .profiles import free_energy_profile

__all__ = ["write_report"]


def _cv_or_none(traj, name: str, cvs: dict):
    try:
        return compute_cv(traj, name, cvs=cvs)
    except CVError:
        return None


def _profile_limits(values: np.ndarray, log_weights: np.ndarray) -> tuple[float, float]:
    """The range holding all but 1e-3 of the reweighted probability, padded by 5%."""
    order = np.argsort(values)
    cdf = np.cumsum(normalized_weights(log_weights)[order])
    low, high = values[order][np.searchsorted(cdf, [5e-4, 1 - 5e-4])]
    pad = 0.05 * (high - low)
    return float(low - pad), float(high + pad)


def write_report(run_dir, samples=None, *, out_dir=None, force: bool = False, bins: int = 64) -> list[Path]:
    """Write the PNG plots of a run (and of its samples) into ``out_dir`` (default ``RUN/plots``).

    Args:
        run_dir: run folder (``metrics.jsonl``; ``data.dcd`` is used as reference MD when present).
        samples: weighted sample DCD written by ``openmm-snf sample`` (None: training curves only).
        force: overwrite existing plots.
    Returns:
        the paths written.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plots.plot_training_curves(run_dir / "metrics.jsonl", out_dir / "training_curves.png", force=force,
                                          title=f"Training curves ({run_dir.name})")]
    if samples is None:
        return written
    weighted = read_weighted_trajectory(samples)
    log_w = weighted.log_weights
    written.append(plots.plot_log_weights(out_dir / "log_weights.png", log_w, force=force))
    cvs = json.loads(str(weighted.extra["cvs_json"])) if "cvs_json" in weighted.extra else {}
    reference = read_trajectory(run_dir / "data.dcd") if (run_dir / "data.dcd").is_file() else None
    phi, psi = _cv_or_none(weighted.traj, "phi", cvs), _cv_or_none(weighted.traj, "psi", cvs)
    if phi is not None and psi is not None:
        ref_angles = None if reference is None else np.column_stack(
            [compute_cv(reference, "phi", cvs=cvs), compute_cv(reference, "psi", cvs=cvs)])
        written.append(plots.plot_ramachandran(out_dir / "ramachandran.png", np.column_stack([phi, psi]), log_w,
                                               reference=ref_angles, bins=bins, force=force))
        name, values, ref_values, limits, label = "phi", phi, (None if ref_angles is None else ref_angles[:, 0]), \
            (-np.pi, np.pi), "φ (rad)"
    elif cvs:
        name = next(iter(cvs))
        values = compute_cv(weighted.traj, name, cvs=cvs)
        ref_values = None if reference is None else compute_cv(reference, name, cvs=cvs)
        limits, label = _profile_limits(values, log_w), name
    else:
        return written
    profile = free_energy_profile(values, log_w, bins=bins, limits=limits)
    ref_profile = None if ref_values is None else free_energy_profile(ref_values, bins=bins, limits=limits)
    written.append(plots.plot_free_energy_profile(
        out_dir / f"profile_{name}.png", profile, reference=ref_profile, xlabel=label, force=force,
        reference_label="training data (MD)", title=f"Free-energy profile along {name}"))
    return written

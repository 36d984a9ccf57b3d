"""The plots of a run: training curves, log weights, convergence, energies, Ramachandran maps and a profile.

Reads only files: the run folder's ``metrics.jsonl``, reference MD (``data.dcd`` when the run made it, or
the DCD it was trained on), and a weighted sample DCD with its sidecar (umbrella samples add the MBAR
overlap matrix). Which plots are drawn depends on what the
molecule has: phi/psi (Ramachandran + phi profile, in degrees) or the first CV of its metadata (a 1-D
profile). The convergence plot splits that CV at 0 and puts the less probable side first (ΔF > 0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..io import InputError, read_trajectory, read_weighted_trajectory, trajectory_paths
from ..weights import normalized_weights
from . import plots
from .cvs import compute_cv
from .errors import CVError
from .free_energy import automatic_block_length
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


def _rare_side_first(values: np.ndarray, log_weights: np.ndarray, name: str):
    """(in_a, in_b, labels) of the states name > 0 and name < 0, the less probable one first."""
    weights = normalized_weights(log_weights)
    above, below = values > 0, values < 0
    if weights[above].sum() <= weights[below].sum():
        return above, below, (f"{name}>0", f"{name}<0")
    return below, above, (f"{name}<0", f"{name}>0")


def _read_reference(path):
    """(mdtraj.Trajectory or None, log weights or None): reference frames, weighted by their sidecar when
    they have one (tempering data: every rung's frames, weighted for the target temperature)."""
    if path is None:
        return None, None
    if trajectory_paths(path).npz.is_file():
        weighted = read_weighted_trajectory(path)
        return weighted.traj, weighted.log_weights
    return read_trajectory(path), None


def write_report(run_dir, samples=None, *, out_dir=None, force: bool = False, bins: int = 64,
                 reference=None, reference_energy=None) -> list[Path]:
    """Write the PNG plots of a run (and of its samples) into ``out_dir`` (default ``RUN/plots``).

    Args:
        run_dir: run folder (``metrics.jsonl``; ``data.dcd`` is used as reference MD when present), or None
            for the samples' plots alone (then ``out_dir`` is required).
        samples: weighted sample DCD written by ``openmm-snf sample`` or ``umbrella`` (None: training curves only).
        reference: reference MD (a DCD with its PDB beside it; default ``RUN/data.dcd`` when it exists).
        force: overwrite existing plots.
        reference_energy: optional function (n, n_atoms, 3) nm -> (n,) reduced energies, to draw the reference
            MD frames in the energy histogram.
    Returns:
        the paths written.
    """
    if run_dir is None and (samples is None or out_dir is None):
        raise ValueError("write_report without a run folder needs samples and out_dir")
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            raise InputError(f"{run_dir / 'metrics.jsonl'} not found: RUN must be a folder written by "
                             "'openmm-snf train'")
        if reference is None and (run_dir / "data.dcd").is_file():
            reference = run_dir / "data.dcd"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder for the plots")
    # every input is read before the first plot is written
    weighted = None if samples is None else read_weighted_trajectory(samples)
    reference, ref_log_w = _read_reference(reference if weighted is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if run_dir is not None:
        written.append(plots.plot_training_curves(run_dir / "metrics.jsonl", out_dir / "training_curves.png",
                                                  force=force, title=f"Training curves ({run_dir.name})"))
    if weighted is None:
        return written
    log_w = weighted.log_weights
    written.append(plots.plot_log_weights(out_dir / "log_weights.png", log_w, force=force))
    cvs = json.loads(str(weighted.extra["cvs_json"])) if "cvs_json" in weighted.extra else {}
    ref_label = "training data (MD)" if ref_log_w is None else "training data (reweighted to T)"
    if "overlap_matrix" in weighted.extra:  # umbrella samples
        written.append(plots.plot_overlap_matrix(out_dir / "overlap.png", weighted.extra["overlap_matrix"],
                                                 centers=weighted.extra.get("window_centers"),
                                                 grid=weighted.extra.get("window_grid"),
                                                 names=weighted.extra.get("window_cvs"), force=force))
    if weighted.reduced_energies is not None:
        ref_u = None
        if reference is not None and reference_energy is not None:
            stride = max(1, reference.n_frames // 5000)
            ref_u = np.asarray(reference_energy(reference.xyz[::stride].astype(np.float64)), dtype=np.float64)
        written.append(plots.plot_energy_histogram(
            out_dir / "energies.png", weighted.reduced_energies, log_w, reference=ref_u, force=force,
            reference_log_weights=None if ref_u is None or ref_log_w is None else ref_log_w[::stride],
            reference_label=ref_label))
    phi, psi = _cv_or_none(weighted.traj, "phi", cvs), _cv_or_none(weighted.traj, "psi", cvs)
    if phi is not None and psi is not None:
        ref_angles = None if reference is None else np.column_stack(
            [compute_cv(reference, "phi", cvs=cvs), compute_cv(reference, "psi", cvs=cvs)])
        written.append(plots.plot_ramachandran(out_dir / "ramachandran.png", np.column_stack([phi, psi]), log_w,
                                               reference=ref_angles, reference_log_weights=ref_log_w,
                                               reference_label=ref_label, bins=bins, force=force))
        name, raw, ref_raw = "phi", phi, (None if ref_angles is None else ref_angles[:, 0])
        values, ref_values = np.degrees(phi), (None if ref_raw is None else np.degrees(ref_raw))
        limits, label = plots.DEGREE_RANGE, "φ (degrees)"
    elif cvs:
        name = next(iter(cvs))
        raw = values = compute_cv(weighted.traj, name, cvs=cvs)
        ref_raw = ref_values = None if reference is None else compute_cv(reference, name, cvs=cvs)
        if cvs[name].get("kind") in ("dihedral", "angle"):  # angles in degrees
            values, ref_values = np.degrees(raw), (None if ref_raw is None else np.degrees(ref_raw))
            limits = plots.DEGREE_RANGE if cvs[name]["kind"] == "dihedral" else (0.0, 180.0)
            label = f"{name} (degrees)"
        else:
            limits, label = _profile_limits(values, log_w), name
    else:
        return written
    in_a, in_b, labels = _rare_side_first(raw, log_w, name)
    if in_a.any() and in_b.any():
        written.append(plots.plot_convergence(out_dir / "convergence.png", log_w, in_a, in_b, labels=labels,
                                              force=force))
    profile = free_energy_profile(values, log_w, bins=bins, limits=limits)
    ref_profile = None if ref_values is None else free_energy_profile(  # MD frames are correlated: bootstrap blocks
        ref_values, ref_log_w, bins=bins, limits=limits,
        block_length=automatic_block_length(ref_raw > 0, ref_raw < 0))
    file_name = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    written.append(plots.plot_free_energy_profile(
        out_dir / f"profile_{file_name}.png", profile, reference=ref_profile, xlabel=label, force=force,
        reference_label=ref_label, title=f"Free-energy profile along {name}"))
    return written

"""PNG plots for reports: training curves, Ramachandran panels, log-weight histogram, free-energy profile.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state) and written
atomically through :func:`openmm_snf.io.atomic_outputs`; an existing PNG is kept unless ``force=True``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import InputError, atomic_outputs
from ..weights import kish_ess, normalized_weights
from .profiles import ANGLE_RANGE, FreeEnergyProfile, free_energy_profile

__all__ = ["read_metrics", "plot_training_curves", "plot_ramachandran", "plot_log_weights",
           "plot_free_energy_profile"]

_X_KEYS = ("iteration", "step", "epoch")


def _save(fig: Figure, path, force: bool) -> Path:
    FigureCanvasAgg(fig)
    path = Path(os.fspath(path))
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: plots are written as PNG; use a .png file name")
    with atomic_outputs([path], force) as (temporary,):
        fig.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    return path


def read_metrics(path) -> list[dict]:
    """Records of a JSON-lines metrics log (one JSON object per line; blank lines skipped).

    A truncated last line (a run interrupted while writing) is ignored; any other malformed line
    raises :class:`~openmm_snf.io.InputError` naming the file and line.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise InputError(f"metrics log not found: {path}")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(lines) - 1 and records:
                break
            raise InputError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise InputError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise InputError(f"metrics log {path} holds no records")
    return records


def _numeric_series(records: list[dict]) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """x-axis key and {metric: (x, y)} for every key with at least one finite number."""
    x_key = next((k for k in _X_KEYS if any(k in r for r in records)), None)
    series = {}
    keys = dict.fromkeys(k for r in records for k in r if k != x_key)
    for key in keys:
        points = [(r.get(x_key, i) if x_key else i, r[key]) for i, r in enumerate(records)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                  and math.isfinite(r[key])]
        if points:
            x, y = np.array(points, dtype=np.float64).T
            series[key] = (x, y)
    return x_key or "record", series


def plot_training_curves(metrics, path, *, force: bool = False, title: str = "Training curves") -> Path:
    """One panel per numeric metric (loss, ess, ...) against the iteration, from a log path or records."""
    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    x_key, series = _numeric_series(records)
    if not series:
        raise InputError(f"no numeric metrics to plot (keys seen: {sorted({k for r in records for k in r})})")
    n_cols = min(3, len(series))
    n_rows = -(-len(series) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.0 * n_rows))
    for k, (key, (x, y)) in enumerate(series.items()):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        ax.plot(x, y, lw=1.0, marker="." if len(x) < 50 else None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, force)


def plot_ramachandran(path, samples, log_weights=None, *, reference=None, bins: int = 64, max_kt: float = 10.0,
                      force: bool = False, title: str = "Ramachandran plot") -> Path:
    """Free-energy maps of (phi, psi): reference MD (if given), raw samples, reweighted samples.

    Args:
        samples: (n, 2) phi/psi in radians of the sampler's output.
        log_weights: (n,) their log weights; None shows only the raw panel.
        reference: (m, 2) phi/psi of reference MD, or None.
        max_kt: colour scale cap in kT.
    """
    panels = []
    if reference is not None:
        panels.append(("reference MD", reference, None))
    panels.append(("samples (raw)", samples, None))
    if log_weights is not None:
        panels.append((f"samples (reweighted, ESS {kish_ess(log_weights):.0f})", samples, log_weights))
    fig = Figure(figsize=(4.4 * len(panels) + 0.8, 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values, log_w) in zip(axes, panels):
        profile = free_energy_profile(values, log_w, bins=bins, limits=ANGLE_RANGE, n_bootstrap=0)
        surface = np.where(np.isfinite(profile.free_energy), np.minimum(profile.free_energy, max_kt), np.nan)
        image = ax.pcolormesh(profile.edges[0], profile.edges[1], surface.T, vmin=0, vmax=max_kt, cmap="viridis")
        ax.set_title(f"{name}\n{len(values)} frames")
        ax.set_xlabel("φ (rad)")
        ax.set_ylabel("ψ (rad)")
        ax.set_aspect("equal")
    fig.colorbar(image, ax=list(axes), label="free energy (kT)", shrink=0.85)
    fig.suptitle(title)
    return _save(fig, path, force)


def plot_log_weights(path, log_weights, *, bins: int = 60, force: bool = False,
                     title: str = "Importance log weights") -> Path:
    """Histogram of log w - max(log w), annotated with the Kish ESS."""
    log_w = np.asarray(log_weights, dtype=np.float64)
    if log_w.ndim != 1 or log_w.size == 0 or not np.all(np.isfinite(log_w)):
        raise InputError("log weights must be a non-empty 1-D array of finite numbers")
    ess = kish_ess(log_w)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(log_w - log_w.max(), bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xlabel("log w − max log w")
    ax.set_ylabel("samples")
    ax.set_title(f"{title}\nKish ESS {ess:.1f} of {log_w.size} ({100 * ess / log_w.size:.1f}%), "
                 f"largest weight {normalized_weights(log_w).max():.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, force)


def plot_free_energy_profile(path, profile: FreeEnergyProfile, *, reference: FreeEnergyProfile | None = None,
                             xlabel: str = "φ (rad)", label: str = "samples (reweighted)",
                             reference_label: str = "reference", force: bool = False,
                             title: str = "Free-energy profile", max_kt: float | None = 15.0) -> Path:
    """A 1-D profile with its bootstrap band, optionally over a reference profile (y axis cut at ``max_kt``)."""
    if len(profile.edges) != 1:
        raise InputError("plot_free_energy_profile draws 1-D profiles; use plot_ramachandran for 2-D")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for prof, name, color in ((reference, reference_label, "0.3"), (profile, label, "tab:red")):
        if prof is None:
            continue
        x = prof.centers[0]
        shown = np.isfinite(prof.free_energy)  # empty bins break the line instead of being bridged
        ax.plot(x, np.where(shown, prof.free_energy, np.nan), color=color, lw=1.5, marker=".", ms=3, label=name)
        band = shown & np.isfinite(prof.upper)
        ax.fill_between(x, np.where(band, prof.lower, np.nan), np.where(band, prof.upper, np.nan), where=band,
                        color=color, alpha=0.25, label=f"{name}: {prof.confidence:.0%} bootstrap band")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("free energy (kT)")
    if max_kt is not None:
        ax.set_ylim(-0.5, max_kt)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, force)

"""PNG plots for reports: training curves, Ramachandran panels, log-weight histogram, convergence with the
number of samples, energy histogram, free-energy profile. Angles are drawn in degrees.

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
from .profiles import FreeEnergyProfile, free_energy_profile

__all__ = ["read_metrics", "plot_training_curves", "plot_ramachandran", "plot_log_weights", "plot_convergence",
           "plot_energy_histogram", "plot_overlap_matrix", "plot_state_free_energies", "state_shares",
           "plot_free_energy_profile", "BOOKKEEPING", "DEGREE_RANGE"]

_X_KEYS = ("iteration", "step", "epoch")
DEGREE_RANGE = (-180.0, 180.0)
DEGREE_TICKS = (-180, -90, 0, 90, 180)


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


BOOKKEEPING = ("lr", "grad_norm", "skipped", "n_skipped", "elapsed_s")  # logged, not plotted
_LOSSES = ("loss", "loss_forward", "loss_reverse", "val_loss")


def _numeric_series(records: list[dict]) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """x-axis key and {metric: (x, y)} for every key with at least one finite number; a dictionary of
    numbers (e.g. ``acceptance`` per block) gives one series per entry, named ``key.entry``."""
    x_key = next((k for k in _X_KEYS if any(k in r for r in records)), None)
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, dict)},
             **{f"{k}.{name}": value for k, v in r.items() if isinstance(v, dict) for name, value in v.items()}}
            for r in records]
    series = {}
    keys = dict.fromkeys(k for r in flat for k in r if k != x_key and k not in BOOKKEEPING)
    for key in keys:
        points = [(r.get(x_key, i) if x_key else i, r[key]) for i, r in enumerate(flat)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                  and math.isfinite(r[key])]
        if points:
            x, y = np.array(points, dtype=np.float64).T
            series[key] = (x, y)
    return x_key or "record", series


def _training_panels(series: dict) -> list[tuple[str, str, dict]]:
    """(title, y label, {legend: (x, y)}) per panel: losses together, ESS in %, acceptance rates together,
    then any other metric on its own."""
    panels = []
    losses = {k: series[k] for k in _LOSSES if k in series}
    if losses:
        panels.append(("loss", "loss (nats per sample, lower is better)", losses))
    if "ess_fraction" in series:
        x, y = series["ess_fraction"]
        panels.append(("Kish ESS of a monitoring batch", "ESS (% of the batch)", {"ess": (x, 100 * y)}))
    acceptance = {k.split(".", 1)[1]: v for k, v in series.items() if k.startswith("acceptance.")}
    if acceptance:
        panels.append(("Metropolis acceptance", "acceptance rate", acceptance))
    used = set(_LOSSES) | {"ess_fraction"} | {k for k in series if k.startswith("acceptance.")}
    panels += [(key, key, {key: value}) for key, value in series.items() if key not in used]
    return panels


def plot_training_curves(metrics, path, *, force: bool = False, title: str = "Training curves") -> Path:
    """Training curves against the iteration, from a log path or records: the losses (and the validation
    loss) in one panel, the ESS in %, acceptance rates, then other numeric metrics; bookkeeping keys
    (:data:`BOOKKEEPING`: learning rate, gradient norm, skipped steps, time) are left out."""
    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    x_key, series = _numeric_series(records)
    if not series:
        raise InputError(f"no numeric metrics to plot (keys seen: {sorted({k for r in records for k in r})})")
    panels = _training_panels(series)
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = Figure(figsize=(4.6 * n_cols, 3.3 * n_rows))
    for k, (name, ylabel, lines) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        for label, (x, y) in lines.items():
            ax.plot(x, y, lw=1.0, marker="." if len(x) < 50 else None, label=label)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        if len(lines) > 1:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, force)


def plot_ramachandran(path, samples, log_weights=None, *, reference=None, reference_log_weights=None,
                      reference_label: str = "reference MD", bins: int = 64, max_kt: float = 10.0,
                      force: bool = False, title: str = "Ramachandran plot") -> Path:
    """Free-energy maps of (phi, psi) in degrees: reference MD (if given), raw samples, reweighted samples.

    Args:
        samples: (n, 2) phi/psi in radians of the sampler's output.
        log_weights: (n,) their log weights; None shows only the raw panel.
        reference: (m, 2) phi/psi of reference MD in radians, or None; ``reference_log_weights`` (m,) weight
            them (e.g. tempering frames reweighted to the target temperature).
        max_kt: colour scale cap in kT.
    """
    panels = []
    if reference is not None:
        panels.append((reference_label, reference, reference_log_weights))
    panels.append(("samples (raw)", samples, None))
    if log_weights is not None:
        panels.append((f"samples (reweighted, ESS {kish_ess(log_weights):.0f})", samples, log_weights))
    fig = Figure(figsize=(4.4 * len(panels) + 0.8, 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values, log_w) in zip(axes, panels):
        profile = free_energy_profile(np.degrees(values), log_w, bins=bins, limits=DEGREE_RANGE, n_bootstrap=0)
        surface = np.where(np.isfinite(profile.free_energy), np.minimum(profile.free_energy, max_kt), np.nan)
        image = ax.pcolormesh(profile.edges[0], profile.edges[1], surface.T, vmin=0, vmax=max_kt, cmap="viridis")
        ax.set_title(f"{name}\n{len(values)} frames")
        ax.set_xlabel("φ (degrees)")
        ax.set_ylabel("ψ (degrees)")
        ax.set_xticks(DEGREE_TICKS)
        ax.set_yticks(DEGREE_TICKS)
        ax.set_aspect("equal")
    fig.colorbar(image, ax=list(axes), label="free energy (kT)", shrink=0.85)
    fig.suptitle(title)
    return _save(fig, path, force)


def plot_log_weights(path, log_weights, *, bins: int = 60, clip_nats: float = 50.0, force: bool = False,
                     title: str = "Importance log weights") -> Path:
    """Histogram of log w - max(log w) over the top ``clip_nats`` nats (weights below e^-clip_nats of the
    largest add nothing to any estimate); the samples left of the range are counted in the title."""
    log_w = np.asarray(log_weights, dtype=np.float64)
    if log_w.ndim != 1 or log_w.size == 0 or not np.all(np.isfinite(log_w)):
        raise InputError("log weights must be a non-empty 1-D array of finite numbers")
    ess = kish_ess(log_w)
    shifted = log_w - log_w.max()
    shown = shifted >= -clip_nats
    low = min(-1.0, max(-clip_nats, float(shifted.min())))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.hist(shifted[shown], bins=bins, range=(low, 0.0), color="tab:blue", alpha=0.8)
    ax.set_xlim(low, 0.0)
    ax.set_xlabel("log w − max log w (nats)")
    ax.set_ylabel("samples")
    hidden = int((~shown).sum())
    ax.set_title(f"{title}\nKish ESS {ess:.1f} of {log_w.size} ({100 * ess / log_w.size:.1f}%), largest weight "
                 f"{normalized_weights(log_w).max():.3f}" + (f"; {hidden} below −{clip_nats:g} not shown" if hidden
                                                            else ""), fontsize="medium")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, force)


def _prefix_sizes(n: int, points: int = 24, smallest: int = 50) -> np.ndarray:
    return np.unique(np.geomspace(min(smallest, n), n, points).astype(int))


def plot_convergence(path, log_weights, in_a, in_b, *, labels=("A", "B"), reference_delta_f: float | None = None,
                     force: bool = False, title: str = "Convergence with the number of samples") -> Path:
    """ΔF = F_A − F_B (kT) and the Kish ESS (total and per state) of the first n samples against n.

    A flat ΔF and an ESS growing in proportion to n say more samples only narrow the interval; a drifting
    ΔF or a flat per-state ESS says the sampler misses part of a state.
    """
    log_w = np.asarray(log_weights, dtype=np.float64)
    in_a, in_b = np.asarray(in_a, dtype=bool), np.asarray(in_b, dtype=bool)
    if log_w.ndim != 1 or in_a.shape != log_w.shape or in_b.shape != log_w.shape or log_w.size < 2:
        raise InputError("log weights and state masks must be 1-D arrays of one equal length >= 2")
    sizes = _prefix_sizes(log_w.size)
    weights = np.exp(log_w - log_w.max())
    with np.errstate(divide="ignore"):
        delta = np.log(np.cumsum(weights * in_b)[sizes - 1]) - np.log(np.cumsum(weights * in_a)[sizes - 1])
    ess = {"all": [kish_ess(log_w[:n]) for n in sizes]}
    for label, mask in zip(labels, (in_a, in_b)):
        ess[label] = [kish_ess(log_w[:n][mask[:n]]) for n in sizes]
    fig = Figure(figsize=(11.0, 4.0))
    left, right = fig.subplots(1, 2)
    left.plot(sizes, np.where(np.isfinite(delta), delta, np.nan), marker=".", color="tab:red", label="samples")
    if reference_delta_f is not None:
        left.axhline(reference_delta_f, color="0.3", ls="--", label="reference")
        left.legend(fontsize="small")
    left.set_xscale("log")
    left.set_xlabel("number of samples n (the first n)")
    left.set_ylabel(f"ΔF = F({labels[0]}) − F({labels[1]}) (kT)")
    left.set_title("free-energy difference")
    left.grid(alpha=0.3)
    for label, values in ess.items():
        right.plot(sizes, values, marker=".", label="all samples" if label == "all" else f"state {label}")
    right.plot(sizes, sizes, color="0.6", ls=":", label="ESS = n (ideal)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("number of samples n (the first n)")
    right.set_ylabel("Kish ESS")
    right.set_title("effective sample size")
    right.legend(fontsize="small")
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, force)


def plot_energy_histogram(path, reduced_energies, log_weights, *, reference=None, reference_log_weights=None,
                          reference_label: str = "reference MD", bins: int = 80, force: bool = False,
                          title: str = "Energies of the samples") -> Path:
    """Histograms of the reduced energy u = U/kT: raw samples, reweighted samples and (if given) reference
    MD frames; where the reweighted histogram matches the reference, the weights recover the Boltzmann
    distribution. The range covers 99.8% of the reweighted (and reference) mass; ``reference_log_weights``
    weight the reference frames (e.g. tempering data reweighted to the target temperature)."""
    u = np.asarray(reduced_energies, dtype=np.float64)
    weights = normalized_weights(log_weights)
    if u.shape != weights.shape or not np.all(np.isfinite(u)):
        raise InputError("reduced energies must be finite, one per log weight")
    order = np.argsort(u)
    cdf = np.cumsum(weights[order])
    low, high = u[order][np.searchsorted(cdf, [1e-3, 1 - 1e-3]).clip(0, u.size - 1)]
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        low, high = min(low, np.quantile(reference, 1e-3)), max(high, np.quantile(reference, 1 - 1e-3))
    pad = 0.05 * (high - low) or 1.0
    edges = np.linspace(low - pad, high + pad, bins + 1)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.hist(u, bins=edges, density=True, histtype="step", color="tab:blue", label="samples (raw)")
    ax.hist(u, bins=edges, weights=weights, density=True, histtype="stepfilled", alpha=0.35, color="tab:red",
            label=f"samples (reweighted, ESS {kish_ess(log_weights):.0f})")
    if reference is not None:
        ax.hist(reference, bins=edges, density=True, histtype="step", color="0.2", lw=1.5,
                weights=None if reference_log_weights is None else normalized_weights(reference_log_weights),
                label=f"{reference_label} ({reference.size} frames)")
    ax.set_xlabel("reduced energy u = U/kT")
    ax.set_ylabel("probability density")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, force)


def state_shares(delta_f: float, ci_low: float, ci_high: float) -> dict[str, tuple[float, float, float]]:
    """Relative populations of two states, P_A / (P_A + P_B) = 1 / (1 + exp(ΔF)) and its complement, with the
    interval that the ΔF interval maps to: ``{"A": (share, low, high), "B": (...)}``."""
    def share(x):
        return float(1.0 / (1.0 + np.exp(np.clip(x, -700, 700))))
    a = (share(delta_f), share(ci_high), share(ci_low))
    return {"A": a, "B": (1 - a[0], 1 - a[2], 1 - a[1])}


def plot_state_free_energies(path, result, *, force: bool = False, title: str | None = None) -> Path:
    """Per-state bars: each state's share of the two states' probability with its 95% interval (mapped from
    the bootstrap interval of ΔF = F_A − F_B), annotated with the state's Kish ESS and sample count.

    Args:
        result: a :class:`~openmm_snf.analysis.FreeEnergyResult`.
    """
    shares = state_shares(result.delta_f, result.ci_low, result.ci_high)
    fig = Figure(figsize=(5.6, 4.2))
    ax = fig.add_subplot()
    labels = [result.label_a, result.label_b]
    values = [shares["A"][0], shares["B"][0]]
    errors = [[v - shares[k][1] for k, v in zip("AB", values)], [shares[k][2] - v for k, v in zip("AB", values)]]
    bars = ax.bar(labels, values, yerr=np.maximum(errors, 0), capsize=8, color=["tab:red", "tab:blue"], alpha=0.8)
    for bar, ess, n in zip(bars, (result.ess_a, result.ess_b), (result.n_a, result.n_b)):
        ax.annotate(f"ESS {ess:.0f} of {n}", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center",
                    fontsize="small", color="white")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of P({result.label_a}) + P({result.label_b})")
    text = f"ΔF = F({result.label_a}) − F({result.label_b}) = {result.delta_f:.2f} kT [{result.ci_low:.2f}, " \
           f"{result.ci_high:.2f}]"
    if result.kT is not None:
        text += f"\n= {result.delta_f * result.kT:.2f} kJ/mol; bars: {result.confidence:.0%} bootstrap intervals"
    ax.set_title(title or text, fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path, force)


def plot_overlap_matrix(path, overlap, *, centers=None, grid=None, names=None, minimum: float = 0.03,
                        force: bool = False,
                        title: str = "MBAR overlap of the umbrella windows") -> Path:
    """The (K, K) MBAR overlap matrix (log colour scale) and each window's overlap with the next; below
    ``minimum`` (red) the windows are weakly linked. For a 2-D grid of windows the right panel is a map over
    the grid of each window's smallest overlap with its next neighbour along either axis.

    Args:
        overlap: (K, K) matrix, rows summing to one (``UmbrellaAnalysis.overlap_matrix()``).
        centers: (K,) window centres in radians (dihedral windows: labelled in degrees), (K, 2) for a grid, or
            None.
        grid: windows per axis, e.g. (24, 24) (None or one axis: a chain of windows); names: the grid axes'
            CV names, for the axis labels.
    """
    matrix = np.asarray(overlap, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise InputError(f"overlap must be a square (K, K) matrix with K >= 2, got shape {matrix.shape}")
    if grid is not None and len(grid) == 2:
        names = ("axis 1", "axis 2") if names is None else tuple(str(name) for name in names)
        return _plot_overlap_grid(path, matrix, tuple(int(n) for n in grid), centers, names, minimum, force, title)
    k = np.arange(len(matrix))
    neighbour = matrix[k, (k + 1) % len(matrix)]
    fig = Figure(figsize=(11.0, 4.4))
    left, right = fig.subplots(1, 2)
    from matplotlib.colors import LogNorm
    image = left.imshow(np.maximum(matrix, 1e-6), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="magma_r")
    fig.colorbar(image, ax=left, label="overlap")
    left.set_xlabel("window j")
    left.set_ylabel("window i")
    left.set_title("overlap matrix O_ij")
    labels = [f"{k}→{(k + 1) % len(matrix)}" for k in k]
    right.bar(k, neighbour, color=np.where(neighbour < minimum, "tab:red", "tab:blue"))
    right.axhline(minimum, color="tab:red", ls="--", lw=1, label=f"{minimum:g}: weakly linked below")
    right.set_xticks(k[:: max(1, len(k) // 12)])
    right.set_xticklabels(labels[:: max(1, len(k) // 12)], fontsize="small")
    right.set_xlabel("neighbouring windows" + ("" if centers is None else
                                               f" (centres {np.degrees(centers[0]):.0f}° … "
                                               f"{np.degrees(centers[-1]):.0f}°)"))
    right.set_ylabel("overlap O_k,k+1")
    right.set_title(f"neighbour overlap (smallest {neighbour.min():.3f})")
    right.legend(fontsize="small")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, force)


def _plot_overlap_grid(path, matrix, grid, centers, names, minimum, force, title) -> Path:
    if int(np.prod(grid)) != len(matrix):
        raise InputError(f"an overlap matrix of {len(matrix)} windows is no {grid[0]} x {grid[1]} grid")
    from .umbrella import next_windows
    smallest = matrix[np.arange(len(matrix)), next_windows(grid)].min(0).reshape(grid)
    fig = Figure(figsize=(11.0, 4.6))
    left, right = fig.subplots(1, 2)
    from matplotlib.colors import LogNorm
    image = left.imshow(np.maximum(matrix, 1e-6), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="magma_r")
    fig.colorbar(image, ax=left, label="overlap")
    left.set(xlabel="window j", ylabel="window i", title="overlap matrix O_ij")
    # rows: first axis, columns: second; in degrees of the windows' centres when known, else window numbers
    where = np.indices(grid).astype(np.float64)
    unit = ""
    if centers is not None:
        where = np.degrees(np.moveaxis(np.asarray(centers, dtype=np.float64).reshape(*grid, 2), -1, 0))
        unit = " centre (°)"
    half = [(axis.max() - axis.min()) / max(n - 1, 1) / 2 for axis, n in zip(where, grid)]
    extent = (where[1].min() - half[1], where[1].max() + half[1], where[0].min() - half[0], where[0].max() + half[0])
    image = right.imshow(np.maximum(smallest, 1e-6), origin="lower", extent=extent, aspect="auto",
                         norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="viridis")
    fig.colorbar(image, ax=right, label="smallest overlap with the next window")
    weak = smallest < minimum
    if weak.any():
        right.scatter(where[1][weak], where[0][weak], marker="x", color="tab:red", label=f"< {minimum:g}: weakly linked")
        right.legend(fontsize="small")
    right.set(xlabel=names[1] + unit, ylabel=names[0] + unit,
              title=f"neighbour overlap over the grid (smallest {smallest.min():.3f})")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, force)


def plot_free_energy_profile(path, profile: FreeEnergyProfile, *, reference: FreeEnergyProfile | None = None,
                             xlabel: str = "φ (degrees)", label: str = "samples (reweighted)",
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

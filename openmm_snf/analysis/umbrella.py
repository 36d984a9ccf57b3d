"""Umbrella sampling analysed with MBAR (pymbar 4): unbiased free energies and per-frame weights.

:func:`umbrella_sampling` runs it along a dihedral (MD of all windows in one Context, then MBAR);
:func:`umbrella_grid` on a grid over several dihedrals with replica exchange (``reus.py``);
:func:`umbrella_mbar` analyses windows sampled by any means.

Window k (replica k of :func:`openmm_snf.md.run_md` with an :class:`~openmm_snf.md.UmbrellaBias`)
samples p_k(x) ∝ exp(−u(x) − b_k(cv(x))), all at one temperature, so the unbiased energy u cancels
and MBAR needs only the reduced bias energies b_k of every frame under every window. Then

* f_k = −ln(Z_k / Z_0), the windows' dimensionless free energies (MBAR's self-consistent solution);
* the unbiased weight of any frame n is w_n ∝ 1 / Σ_k N_k exp(f_k − b_k(cv_n));
* ΔF_AB = F_A − F_B = −ln(Σ_A w / Σ_B w), with MBAR's analytic uncertainty (the states as indicator
  energies, 0 inside and +inf outside).

MBAR is solved by :class:`~.mbar.BlockMBAR` on every uncorrelated frame, the bias energies computed block
by block (a 24 x 24 grid of 500 frames per window holds 1.4e8 of them, too many for pymbar).

MD frames are correlated: MBAR is solved on each window's frames subsampled by its statistical
inefficiency g_k (pymbar.timeseries, computed on the CV's deviation from the window centre), so the
analytic uncertainty is that of uncorrelated samples; the per-frame weights of *all* frames follow from
the f_k and the full window counts (use them for reweighted histograms).
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import math
from dataclasses import dataclass, replace
from functools import cached_property

import mdtraj
import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from ..energy import OpenMMEnergy
from ..md import MDSettings, UmbrellaBias, run_md
from ..reus import ExchangeSettings, run_exchange_umbrella
from ..systems import MolecularSystem
from .cvs import compute_cv, resolve_dihedral
from .errors import AnalysisError, CVError, EmptyStateError
from .mbar import BlockMBAR

__all__ = ["UmbrellaAnalysis", "UmbrellaFreeEnergy", "UmbrellaSampling", "dihedral_grid_biases", "dihedral_grid_centers",
           "next_windows", "umbrella_dihedral", "umbrella_grid", "umbrella_sampling", "umbrella_mbar",
           "MIN_NEIGHBOUR_OVERLAP"]

MIN_NEIGHBOUR_OVERLAP = 0.03  # MBAR overlap of neighbouring windows below which their free-energy link is weak
_BLOCK_ENTRIES = 1 << 23  # (windows x frames) bias energies held at once when weighting frames: 64 MB


def _timeseries():
    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
        from pymbar import timeseries  # pymbar prints an advertisement for JAX on import
    return timeseries


@dataclass(frozen=True)
class UmbrellaFreeEnergy:
    """ΔF = F_A − F_B in kT from MBAR with its analytic standard error and normal interval."""

    label_a: str
    label_b: str
    delta_f: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    population_a: float
    population_b: float
    n_uncorrelated_a: int
    n_uncorrelated_b: int

    def summary(self) -> str:
        return (f"dF({self.label_a} - {self.label_b}) = {self.delta_f:.3f} ± {self.std:.3f} kT "
                f"[{self.ci_low:.3f}, {self.ci_high:.3f}] ({self.confidence:.0%}, umbrella sampling + MBAR; "
                f"{self.n_uncorrelated_a} and {self.n_uncorrelated_b} uncorrelated frames)")


@dataclass(frozen=True)
class UmbrellaAnalysis:
    """MBAR solution of an umbrella-sampling run.

    Attributes:
        f_windows: (K,) f_k in kT, f_0 = 0.
        df_windows: (K,) MBAR standard errors of f_k − f_0.
        log_weights: (K * n_frames,) unbiased log weights of all frames, window-major (the order of
            ``frames.reshape(-1, ...)`` for frames of shape (K, n_frames, ...)), normalized (logsumexp 0).
        statistical_inefficiency: (K,) g_k of each window.
        kept: (K * n_frames,) bool, the frames MBAR was solved on (every g_k-th frame of each window).
    """

    f_windows: np.ndarray
    df_windows: np.ndarray
    log_weights: np.ndarray
    statistical_inefficiency: np.ndarray
    kept: np.ndarray
    mbar: BlockMBAR

    def overlap_matrix(self) -> np.ndarray:
        """(K, K) MBAR overlap matrix O: O_ij is the probability that a frame of window i is attributed to
        window j; each row sums to one."""
        return self._overlap.copy()

    @cached_property
    def _overlap(self) -> np.ndarray:  # computed once: for a 24 x 24 grid it takes seconds
        return self.mbar.overlap_matrix()

    def delta_f(self, in_a, in_b, *, labels=("A", "B"), confidence: float = 0.95) -> UmbrellaFreeEnergy:
        """F_A − F_B for boolean masks (K * n_frames,) over all frames (window-major)."""
        in_a, in_b = (np.asarray(m, dtype=bool).reshape(-1) for m in (in_a, in_b))
        if in_a.shape != self.kept.shape or in_b.shape != self.kept.shape:
            raise AnalysisError(f"state masks must have {self.kept.size} entries (all frames), got "
                                f"{in_a.size} and {in_b.size}")
        if not 0 < confidence < 1:
            raise AnalysisError(f"confidence must lie in (0, 1), got {confidence}")
        for label, mask in zip(labels, (in_a, in_b)):
            if not (mask & self.kept).any():
                raise EmptyStateError(f"state {label!r} holds none of the {int(self.kept.sum())} uncorrelated "
                                      "umbrella frames; add windows there or sample longer")
        a, b = in_a[self.kept], in_b[self.kept]
        f, theta = self.mbar.region_free_energies(np.stack([a, b]))
        delta_f, std = float(f[0] - f[1]), math.sqrt(max(theta[0, 0] + theta[1, 1] - 2 * theta[0, 1], 0.0))
        z = float(norm.ppf(0.5 + confidence / 2))
        weights = np.exp(self.log_weights)
        return UmbrellaFreeEnergy(labels[0], labels[1], delta_f, std, delta_f - z * std, delta_f + z * std,
                                  confidence, float(weights[in_a].sum()), float(weights[in_b].sum()),
                                  int(a.sum()), int(b.sum()))


def dihedral_grid_centers(windows: int, n_axes: int) -> np.ndarray:
    """(windows ** n_axes, n_axes) window centres in radians: ``windows`` evenly on [−π, π) per axis, in C
    order over the grid (the last axis varies fastest)."""
    axis = np.linspace(-np.pi, np.pi, windows, endpoint=False)
    return np.stack(np.meshgrid(*[axis] * n_axes, indexing="ij"), axis=-1).reshape(-1, n_axes)


def dihedral_grid_biases(atoms, windows: int, force_constant: float) -> tuple[UmbrellaBias, ...]:
    """One :class:`~openmm_snf.md.UmbrellaBias` per dihedral (``atoms``: its 4 indices per axis) of the grid of
    :func:`dihedral_grid_centers`; their energies add up in each window."""
    centers = dihedral_grid_centers(windows, len(atoms))
    return tuple(UmbrellaBias("dihedral", tuple(one), tuple(centers[:, column]), force_constant)
                 for column, one in enumerate(atoms))


def next_windows(shape) -> np.ndarray:
    """(n_axes, K) the index of each window's next neighbour along each axis of a grid of windows (C order),
    the last window of an axis wrapping around to its first (dihedral axes)."""
    grid = np.arange(int(np.prod(shape))).reshape(shape)
    return np.stack([np.roll(grid, -1, axis).reshape(-1) for axis in range(len(shape))])


def _check_cv(cv, bias) -> np.ndarray:
    cv = np.asarray(cv, dtype=np.float64)
    n_windows = len(bias.centers)
    if cv.ndim != 2 or cv.shape[0] != n_windows or cv.shape[1] < 2:
        raise AnalysisError(f"cv must be (n_windows={n_windows}, n_frames >= 2), one row per window, got "
                            f"shape {cv.shape}")
    if not np.all(np.isfinite(cv)):
        raise AnalysisError("cv values contain nan or inf")
    return cv


def umbrella_mbar(cv, bias, *, decorrelate: bool = True) -> UmbrellaAnalysis:
    """Solve MBAR for umbrella windows.

    Args:
        cv: (K, n_frames) biased CV of each window's frames (radians for a dihedral bias, nm for a
            position bias), e.g. phi of ``run_md(..., bias=bias)`` frames, replica k in row k; with
            several biases, a sequence of such arrays, one per bias.
        bias: the :class:`~openmm_snf.md.UmbrellaBias` the frames were sampled with (K windows), or the
            biases acting together (e.g. windows on a grid over phi and psi; their energies add).
        decorrelate: subsample each window by its statistical inefficiency (of the CV's deviation from the
            window centre; with several biases, of the window's bias energy) before solving MBAR (False: use
            every frame, e.g. for independent samples). The weights of all frames follow from the solution.
    """
    timeseries = _timeseries()
    biases, cvs = ((bias,), (cv,)) if isinstance(bias, UmbrellaBias) else (tuple(bias), tuple(cv))
    if not biases or len(cvs) != len(biases):
        raise AnalysisError(f"need one cv array per bias, got {len(cvs)} for {len(biases)}")
    cvs = [_check_cv(values, one) for values, one in zip(cvs, biases)]
    if len({values.shape for values in cvs}) > 1:
        raise AnalysisError(f"the biases' cv arrays differ in shape: {[values.shape for values in cvs]}")
    n_windows, n_frames = cvs[0].shape

    # a grid of W x W windows has only W distinct centres per axis: the energies are computed for those
    distinct = [np.unique(np.asarray(one.centers, dtype=np.float64), return_inverse=True) for one in biases]

    def bias_energies(frames) -> np.ndarray:
        """(K, len(frames)): the summed bias energy of frames (flat, window-major indices) under every window."""
        return sum(replace(one, centers=tuple(centers)).reduced_energies(values.reshape(-1)[frames])[inverse]
                   for one, values, (centers, inverse) in zip(biases, cvs, distinct))

    if len(biases) == 1:
        series = np.stack([replace(bias, centers=(bias.centers[k],)).deviation(row)[0] for k, row in enumerate(cvs[0])])
    else:  # each window's own bias energy along its frames
        series = np.stack([sum(replace(one, centers=(one.centers[k],)).reduced_energies(values[k])[0]
                               for one, values in zip(biases, cvs)) for k in range(n_windows)])
    kept = np.zeros((n_windows, n_frames), dtype=bool)
    inefficiency = np.ones(n_windows)
    for k in range(n_windows):
        if decorrelate and np.ptp(series[k]) > 0:
            inefficiency[k] = float(timeseries.statistical_inefficiency(series[k]))
        kept[k, np.unique(np.minimum(np.round(np.arange(0, n_frames, inefficiency[k])), n_frames - 1).astype(int))] = True
    n_k = kept.sum(1)
    kept = kept.reshape(-1)
    kept_frames = np.flatnonzero(kept)
    mbar = BlockMBAR(lambda indices: bias_energies(kept_frames[indices]), n_k)
    f_k = mbar.f_k
    # every frame's weight, in blocks of frames: a grid's full u_kn (576 windows x 288,000 frames) is 1.3 GB
    log_w = np.empty(kept.size)
    block = max(1, _BLOCK_ENTRIES // n_windows)
    for start in range(0, kept.size, block):
        frames = np.arange(start, min(start + block, kept.size))
        log_w[frames] = -logsumexp(math.log(n_frames) + f_k[:, None] - bias_energies(frames), axis=0)
    log_w -= logsumexp(log_w)
    return UmbrellaAnalysis(f_windows=f_k - f_k[0], df_windows=mbar.free_energy_errors(),
                            log_weights=log_w, statistical_inefficiency=inefficiency, kept=kept, mbar=mbar)


def umbrella_dihedral(mol: MolecularSystem, cv: str) -> tuple[list[int], dict]:
    """The 4 atoms of the dihedral ``cv`` (as :func:`~openmm_snf.analysis.cvs.resolve_dihedral`) and the
    system's CV definitions with ``cv`` added, so that later analyses resolve it the same way.

    Raises:
        CVError: unknown name, not a dihedral, or not four different atoms.
    """
    atoms = resolve_dihedral(mol.mdtraj_topology(), cv, mol.cvs)
    if len(set(atoms)) != 4:
        raise CVError(f"--cv {cv!r}: a dihedral needs four different atoms, got {list(atoms)}")
    return atoms, {**mol.cvs, cv: {"kind": "dihedral", "atoms": atoms}}


@dataclass(frozen=True)
class UmbrellaSampling:
    """Umbrella sampling along one dihedral or on a grid over several, and its MBAR solution.

    Attributes:
        cv_names: the biased dihedrals' names, one per grid axis; cvs: CV definitions including them.
        biases: one :class:`~openmm_snf.md.UmbrellaBias` per axis (one centre per window, windows in C order
            over ``shape``; force constants in kT/rad²); shape: windows per axis.
        xyz: (K · n_frames, n_atoms, 3) nm, window-major; cv: (n_axes, K · n_frames) radians.
        reduced_energies: (K · n_frames,) unbiased u = U/kT of every frame.
        analysis: the :class:`UmbrellaAnalysis` (``.log_weights`` unbiased, per frame).
        exchange_acceptance: per axis, the fraction of replica swaps accepted (empty without exchanges);
        md_acceptance: the fraction of dynamics steps accepted (Metropolized exchange runs; else None).
    """

    cv_names: tuple
    cvs: dict
    biases: tuple
    shape: tuple
    xyz: np.ndarray
    cv: np.ndarray
    reduced_energies: np.ndarray
    analysis: UmbrellaAnalysis
    exchange_acceptance: tuple = ()
    md_acceptance: float | None = None

    @property
    def n_windows(self) -> int:
        return len(self.biases[0].centers)

    def window_centers(self) -> np.ndarray:
        """(K,) centres in radians for one axis, (K, n_axes) for a grid."""
        centers = np.stack([np.asarray(bias.centers) for bias in self.biases], axis=-1)
        return centers[:, 0] if len(self.biases) == 1 else centers

    def neighbour_overlaps(self) -> np.ndarray:
        """(n_axes, K): MBAR overlap of each window with the next along each axis (dihedral axes wrap around);
        below :data:`MIN_NEIGHBOUR_OVERLAP` the windows are weakly linked there."""
        return self.analysis.overlap_matrix()[np.arange(self.n_windows), next_windows(self.shape)]

    def sidecar(self, mol: MolecularSystem) -> dict:
        """Entries for the trajectory's weights sidecar: kT, the CVs, each frame's window, the windows' centres,
        grid shape, biased CV names, force constants and every frame's biased CV values, and N_k, f_k and the
        overlap matrix for pymbar; along one dihedral also u_kn (a grid's would hold windows² x frames)."""
        n_frames = self.cv.shape[1] // self.n_windows
        entries = {"kT": mol.kT, "temperature": mol.temperature, "cvs_json": json.dumps(self.cvs),
                   "window": np.repeat(np.arange(self.n_windows), n_frames), "window_centers": self.window_centers(),
                   "window_grid": np.asarray(self.shape), "window_cvs": np.asarray(self.cv_names),
                   "window_cv_values": self.cv,
                   "force_constants": np.array([bias.force_constant for bias in self.biases], dtype=np.float64),
                   "N_k": np.full(self.n_windows, n_frames), "f_k": self.analysis.f_windows,
                   "overlap_matrix": self.analysis.overlap_matrix()}
        if len(self.biases) == 1:
            entries["u_kn"] = self.biases[0].reduced_energies(self.cv[0])
        return entries

    def delta_f(self) -> UmbrellaFreeEnergy:
        """F(cv > 0) − F(cv < 0) in kT of the first biased dihedral (the rare state first for alanine's phi, as
        the README's sign convention)."""
        name, values = self.cv_names[0], self.cv[0]
        return self.analysis.delta_f(values > 0, values < 0, labels=(f"{name}>0", f"{name}<0"))


def umbrella_sampling(mol: MolecularSystem, cv: str, settings: MDSettings, *, force_constant: float,
                      platform: str | None = None, threads: int | None = None,
                      progress: bool = True) -> UmbrellaSampling:
    """Umbrella sampling along the dihedral ``cv``: ``settings.n_replicas`` harmonic windows centred evenly
    on [−π, π) with ``force_constant`` (kT/rad²), one replica each in one OpenMM Context
    (:func:`~openmm_snf.md.run_md`), solved with :func:`umbrella_mbar`; every frame's unbiased energy
    comes from :class:`~openmm_snf.energy.OpenMMEnergy` on ``platform``."""
    atoms, cvs = umbrella_dihedral(mol, cv)
    centers = np.linspace(-np.pi, np.pi, settings.n_replicas, endpoint=False)
    bias = UmbrellaBias("dihedral", tuple(atoms), tuple(centers), force_constant)
    xyz = run_md(mol, settings, platform=platform, threads=threads, bias=bias,
                 progress=progress).reshape(-1, mol.n_atoms, 3)
    values = compute_cv(mdtraj.Trajectory(xyz, mol.mdtraj_topology()), cv, cvs=cvs)
    analysis = umbrella_mbar(values.reshape(settings.n_replicas, -1), bias)
    energies, _ = OpenMMEnergy(mol, platform=platform, threads=threads).energy_and_forces(torch.as_tensor(xyz))
    return UmbrellaSampling((cv,), cvs, (bias,), (settings.n_replicas,), xyz, values[None], energies.numpy(),
                            analysis)


def umbrella_grid(mol: MolecularSystem, cv_names, windows: int, settings: ExchangeSettings, *,
                  force_constant: float, energy: OpenMMEnergy | None = None, starts: np.ndarray | None = None,
                  progress: bool = True) -> UmbrellaSampling:
    """Replica-exchange umbrella sampling on a grid over the dihedrals ``cv_names`` (e.g. ("phi", "psi")):
    ``windows`` centres evenly on [−π, π) per axis (windows ** n_axes in all) with ``force_constant``
    (kT/rad²), all copies one batch of the energy, neighbouring windows swapping copies along each axis
    (:func:`~openmm_snf.reus.run_exchange_umbrella`; ``energy`` and ``starts`` are passed on), solved with
    :func:`umbrella_mbar`. Holding every backbone dihedral of a residue keeps each window from staying in the
    basin its start chose (along phi alone, alanine windows kept their psi basin for hundreds of ps)."""
    cv_names = tuple(cv_names)
    if not cv_names or len(set(cv_names)) != len(cv_names):
        raise CVError(f"--cv: need distinct dihedrals for the grid axes, got {list(cv_names)}")
    atoms = [umbrella_dihedral(mol, name)[0] for name in cv_names]
    cvs = {**mol.cvs, **{name: {"kind": "dihedral", "atoms": axis} for name, axis in zip(cv_names, atoms)}}
    biases = dihedral_grid_biases(atoms, windows, force_constant)
    shape = (windows,) * len(cv_names)
    run = run_exchange_umbrella(mol, biases, shape, settings, energy=energy, starts=starts, progress=progress)
    analysis = umbrella_mbar(tuple(run.cvs), biases)
    return UmbrellaSampling(cv_names, cvs, biases, shape, run.xyz.reshape(-1, mol.n_atoms, 3),
                            run.cvs.reshape(len(cv_names), -1), run.reduced_energies.reshape(-1), analysis,
                            run.exchange_acceptance, run.md_acceptance if settings.metropolize else None)

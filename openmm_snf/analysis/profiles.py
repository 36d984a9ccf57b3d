"""Free-energy profiles (1-D and 2-D histograms of weighted samples) and histogram KL divergences.

F(bin) = -ln p(bin) in kT, shifted so that its minimum is 0; p is normalized over the samples inside the
histogram range (samples outside it are left out and counted). Uncertainty bands come from a bootstrap
over frames: each replicate is shifted by the same constant as the point estimate, so the band shows the
uncertainty of each bin relative to the estimate's minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..weights import normalized_weights
from .errors import AnalysisError
from .free_energy import bootstrap_indices

__all__ = ["FreeEnergyProfile", "free_energy_profile", "histogram_kl_divergence", "ANGLE_RANGE"]

ANGLE_RANGE = (-math.pi, math.pi)


@dataclass(frozen=True)
class FreeEnergyProfile:
    """A 1-D or 2-D free-energy surface in kT.

    Attributes:
        edges: tuple of bin-edge arrays, one per dimension ((bins + 1,) each).
        free_energy: (bins,) or (bins_x, bins_y) float64, min 0, +inf in bins without weight.
        lower, upper: bootstrap percentile band, same shape (+inf where a replicate left the bin empty).
        std: bootstrap standard deviation over replicates in which the bin is populated (nan if < 2).
        counts: samples per bin (int).
        n_outside: samples outside the range (not in the histogram).
        confidence: level of the band.
    """

    edges: tuple
    free_energy: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    std: np.ndarray
    counts: np.ndarray
    n_outside: int
    confidence: float

    @property
    def centers(self) -> tuple:
        """Bin centres, one array per dimension."""
        return tuple((e[1:] + e[:-1]) / 2 for e in self.edges)


def _as_samples(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    if values.ndim != 2 or values.shape[1] not in (1, 2) or len(values) == 0:
        raise AnalysisError(f"values must be (n,) or (n, 2) with n >= 1, got shape {np.shape(values)}")
    if not np.all(np.isfinite(values)):
        raise AnalysisError("values contain nan or inf")
    return values


def _ranges(limits, n_dims: int) -> list[tuple[float, float]]:
    ranges = [tuple(limits)] * n_dims if np.ndim(limits) == 1 else [tuple(r) for r in limits]
    if len(ranges) != n_dims or any(len(r) != 2 or not r[0] < r[1] for r in ranges):
        raise AnalysisError(f"range limits must be (low, high) or one (low, high) per dimension, got {limits}")
    return ranges


def _bin_index(values: np.ndarray, bins: int, ranges) -> np.ndarray:
    """Flat bin index per sample (-1 outside); bins are [low, high) except the last, which includes high."""
    flat = np.zeros(len(values), dtype=np.int64)
    inside = np.ones(len(values), dtype=bool)
    for dim, (low, high) in enumerate(ranges):
        position = (values[:, dim] - low) / (high - low) * bins
        inside &= (position >= 0) & (position <= bins)
        flat = flat * bins + np.clip(position.astype(np.int64), 0, bins - 1)
    return np.where(inside, flat, -1)


def _weighted_histogram(bin_index, weights, n_bins: int) -> np.ndarray:
    inside = bin_index >= 0
    return np.bincount(bin_index[inside], weights=weights[inside], minlength=n_bins)


def _free_energy(histogram: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.log(histogram / histogram.sum())


def free_energy_profile(values, log_weights=None, *, bins: int = 64, limits=ANGLE_RANGE, n_bootstrap: int = 200,
                        confidence: float = 0.95, seed: int = 0, block_length: int = 1) -> FreeEnergyProfile:
    """Free-energy profile of one CV (values (n,)) or two (values (n, 2), e.g. phi/psi) with bootstrap bands.

    Args:
        values: (n,) or (n, 2) float CV values (radians for angles).
        log_weights: (n,) log importance weights; None for equal weights.
        bins: bins per dimension.
        limits: (low, high), or one pair per dimension; default [-pi, pi).
        n_bootstrap: bootstrap replicates (0 for no bands: lower = upper = estimate, std = nan).
        confidence: two-sided level of the band.
        seed: seed of the bootstrap ``numpy.random.Generator``.
        block_length: frames per resampled block (> 1 for correlated MD frames).
    """
    samples = _as_samples(values)
    n, n_dims = samples.shape
    weights = np.full(n, 1.0 / n) if log_weights is None else normalized_weights(log_weights)
    if weights.shape != (n,):
        raise AnalysisError(f"log_weights has shape {np.shape(log_weights)}, expected ({n},)")
    ranges = _ranges(limits, n_dims)
    index = _bin_index(samples, bins, ranges)
    if np.all(index < 0):
        raise AnalysisError(f"no sample lies inside the histogram range {ranges}")
    n_bins = bins ** n_dims
    shape = (bins,) * n_dims
    histogram = _weighted_histogram(index, weights, n_bins)
    shift = _free_energy(histogram)[histogram > 0].min()
    estimate = _free_energy(histogram) - shift
    lower, upper, std = estimate, estimate, np.full(n_bins, np.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        replicates = np.empty((n_bootstrap, n_bins))
        for k in range(n_bootstrap):  # one replicate at a time: memory O(n), not O(n_bootstrap * n)
            rows = bootstrap_indices(n, 1, rng, block_length)[0]
            replicates[k] = _free_energy(_weighted_histogram(index[rows], weights[rows], n_bins)) - shift
        tail = (1 - confidence) / 2
        lower, upper = np.quantile(replicates, [tail, 1 - tail], axis=0, method="inverted_cdf")
        std = _finite_std(replicates)
    edges = tuple(np.linspace(low, high, bins + 1) for low, high in ranges)
    counts = np.bincount(index[index >= 0], minlength=n_bins)
    return FreeEnergyProfile(edges, estimate.reshape(shape), lower.reshape(shape), upper.reshape(shape),
                             std.reshape(shape), counts.reshape(shape), int(np.sum(index < 0)), confidence)


def _finite_std(replicates: np.ndarray) -> np.ndarray:
    """Per-bin standard deviation over the replicates where the bin is populated (nan if fewer than 2)."""
    finite = np.isfinite(replicates)
    n_finite = finite.sum(0)
    values = np.where(finite, replicates, 0.0)
    mean = values.sum(0) / np.maximum(n_finite, 1)
    variance = np.where(finite, (values - mean) ** 2, 0.0).sum(0) / np.maximum(n_finite - 1, 1)
    return np.where(n_finite >= 2, np.sqrt(variance), np.nan)


def histogram_kl_divergence(reference, samples, *, reference_log_weights=None, log_weights=None, bins: int = 64,
                            limits=ANGLE_RANGE, eps: float = 1e-10) -> float:
    """KL(reference || samples) = sum_bins p ln(p / q) between two (weighted) histograms, in nats.

    ``reference``/``samples`` are (n,) or (n, 2) CV values; each histogram is normalized over the range,
    ``eps`` is added to every bin of both (then renormalized) so that empty bins give a finite number.
    """
    histograms = []
    for values, log_w in ((reference, reference_log_weights), (samples, log_weights)):
        data = _as_samples(values)
        weights = np.full(len(data), 1.0 / len(data)) if log_w is None else normalized_weights(log_w)
        if weights.shape != (len(data),):
            raise AnalysisError(f"log weights of shape {np.shape(log_w)} for {len(data)} samples")
        index = _bin_index(data, bins, _ranges(limits, data.shape[1]))
        histogram = _weighted_histogram(index, weights, bins ** data.shape[1]) + eps
        histograms.append(histogram / histogram.sum())
    p, q = histograms
    if p.shape != q.shape:
        raise AnalysisError("reference and samples must have the same number of CVs")
    return float(np.sum(p * np.log(p / q)))

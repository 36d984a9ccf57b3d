"""Importance-weight arithmetic shared by the sampler and the analysis (numpy or torch, float64).

All functions take log weights, never raw weights, so that weights spanning hundreds of kT stay finite.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["kish_ess", "normalized_weights", "log_mean_exp", "pareto_khat"]

PSIS_PRIOR_OBSERVATIONS = 10  # weight of PSIS's weakly informative prior on the shape, centred on 0.5


def _as_float64(log_weights):
    if isinstance(log_weights, torch.Tensor):
        return log_weights.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(log_weights, dtype=np.float64))


def normalized_weights(log_weights) -> np.ndarray:
    """Self-normalized importance weights w_i / sum_j w_j as a float64 numpy array (n,)."""
    lw = _as_float64(log_weights)
    return torch.softmax(lw, dim=0).cpu().numpy()


def kish_ess(log_weights) -> float:
    """Kish effective sample size (sum w)^2 / sum w^2, from log weights (n,)."""
    lw = _as_float64(log_weights)
    if lw.numel() == 0:
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def log_mean_exp(log_weights) -> float:
    """log((1/n) sum_i exp(log_w_i)): the importance-sampling estimate of log Z_X/Z_Z."""
    lw = _as_float64(log_weights)
    return float(torch.logsumexp(lw, 0) - math.log(lw.numel()))


def _gpd_shape(x: np.ndarray) -> float:
    """Shape xi of a generalized Pareto distribution (location 0) fitted to positive exceedances ``x`` (M,).

    Zhang & Stephens (2009), in their parameters k = -xi, theta = k / sigma: the profile log likelihood is
    l(theta) = M [log(theta / k(theta)) + k(theta) - 1] with k(theta) = -mean(log(1 - theta x)); theta is its
    posterior mean over the grid theta_j = 1/x_(M) + (1 - sqrt(m / (j - 1/2))) / (3 x_(M/4)), j = 1..m
    (quantiles of their empirical prior; every theta_j < 1/x_(M), so 1 - theta x > 0 for all samples).
    """
    x = np.sort(x)
    n = len(x)
    m = 30 + int(math.sqrt(n))
    theta = 1 / x[-1] + (1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3 * x[int(n / 4 + 0.5) - 1])
    k = -np.mean(np.log1p(-theta[:, None] * x[None, :]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # theta = 0 exactly: a zero-probability grid point
        profile = n * (np.log(theta / k) + k - 1)
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    posterior = np.exp(profile - profile.max())
    theta_hat = np.sum(theta * posterior) / np.sum(posterior)
    return float(np.mean(np.log1p(-theta_hat * x)))


def pareto_khat(log_weights) -> float:
    """Pareto k-hat of the upper tail of the importance weights (PSIS; Vehtari, Simpson, Gelman, Yao & Gabry).

    A generalized Pareto distribution is fitted to the M = ceil(min(n/5, 3 sqrt(n))) largest weights above
    the next largest one (in ratios to the largest weight, so that any log-weight range stays finite) by
    Zhang & Stephens' estimator, and its shape xi is shrunk toward 0.5 as PSIS does:
    k = (M xi + 10 * 0.5) / (M + 10). k < 0.5: the weights' variance is finite, estimates converge at the
    usual rate; 0.5-0.7: usable; > 0.7: too heavy a tail for the estimate to be trusted.

    Args:
        log_weights: (n,) log importance weights; non-finite entries are left out.
    Returns:
        k-hat; ``-inf`` when the largest weights are all equal (no tail at all); ``nan`` when there are too
        few samples to fit (fewer than 5 distinct tail weights, i.e. n < 25).
    """
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    lw = np.sort(lw[np.isfinite(lw)])
    n_tail = math.ceil(min(len(lw) / 5, 3 * math.sqrt(len(lw))))
    if n_tail < 5:
        return math.nan
    exceedances = np.exp(lw[-n_tail:] - lw[-1]) - np.exp(lw[-n_tail - 1] - lw[-1])
    exceedances = exceedances[exceedances > 0]  # ties at the threshold carry no tail information
    if len(exceedances) == 0:
        return -math.inf
    if len(exceedances) < 5:
        return math.nan
    xi = _gpd_shape(exceedances)
    n_fit = len(exceedances)
    return (n_fit * xi + PSIS_PRIOR_OBSERVATIONS * 0.5) / (n_fit + PSIS_PRIOR_OBSERVATIONS)

"""Importance-weight arithmetic shared by the sampler and the analysis (numpy or torch, float64).

All functions take log weights, never raw weights, so that weights spanning hundreds of kT stay finite.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["kish_ess", "normalized_weights", "log_mean_exp"]


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

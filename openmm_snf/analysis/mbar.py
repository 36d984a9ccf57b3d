"""MBAR (Shirts & Chodera 2008) solved over blocks of samples: exact on every sample, in memory K x block.

An umbrella grid of K = 576 windows with 250,000 uncorrelated frames is 1.4e8 reduced energies u_kn;
pymbar 4 holds several such arrays at once (~90 bytes per entry: 13.8 GB for 576 windows x 265,637 frames,
measured), so it had been given a thinned fifth of the frames. Here ``reduced_energies(indices)`` computes
a block of u_kn's columns whenever a pass over the samples needs them (for umbrella windows the bias
energies are cheap); u_kn is kept only when it fits in 2 GB.

* The free energies f_k (f_0 = 0) minimise the convex function
  F(f) = sum_n ln sum_k N_k exp(f_k - u_kn) - sum_k N_k f_k; Newton's method with a backtracking line
  search solves it, after a few self-consistent iterations from f = 0.
* W_nk = exp(f_k - u_kn) / sum_j N_j exp(f_j - u_jn), the weight of sample n in state k.
* Their asymptotic covariance is Theta = V S (I - S V' N V S)^+ S V' with W = U S V' (Shirts & Chodera,
  eq. D8); only W'W = V S^2 V' is needed, a K x K sum over blocks. A state that was not sampled (N = 0),
  e.g. an indicator of a region (u = 0 inside, +inf outside), adds a column to W and so gets its f and
  covariance the same way: this gives the uncertainty of F_A - F_B.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp

__all__ = ["BlockMBAR"]

_BLOCK_ENTRIES = 1 << 22  # u_kn entries computed at once: 32 MB
_CACHE_BYTES = 2 << 30  # u_kn up to this size is computed once and kept, so passes need not recompute it


def _logsumexp0(a: np.ndarray) -> np.ndarray:
    """ln sum exp over axis 0 (a few times faster than scipy's on (K, m) blocks); an all -inf column gives -inf."""
    peak = a.max(0)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return peak + np.log(np.exp(a - peak).sum(0))


class BlockMBAR:
    """MBAR for K states with ``n_k`` samples each, N = sum(n_k) samples in all.

    Args:
        reduced_energies: indices (m,) of samples -> (K, m) reduced energies of those samples in every state.
        n_k: (K,) samples drawn from each state (order irrelevant: only the counts enter MBAR).
        tolerance: stop when every |dF/df_k| / N is below it, step_tolerance: or when Newton's step in every
            f_k (kT) is.
    """

    def __init__(self, reduced_energies: Callable[[np.ndarray], np.ndarray], n_k, *, tolerance: float = 1e-8,
                 step_tolerance: float = 1e-9, max_iterations: int = 100):
        self.n_k = np.asarray(n_k, dtype=np.float64)
        if self.n_k.ndim != 1 or self.n_k.size < 1 or np.any(self.n_k < 0) or self.n_k.sum() <= 0:
            raise ValueError(f"n_k must be non-negative counts with a positive sum, got {n_k!r}")
        self._energies = reduced_energies
        self.n_states, self.n_samples = self.n_k.size, int(self.n_k.sum())
        self._block = max(1, _BLOCK_ENTRIES // self.n_states)
        self._cache = None
        if 8 * self.n_states * self.n_samples <= _CACHE_BYTES:
            self._cache = list(self._blocks())
        self._log_n = np.log(np.maximum(self.n_k, 1e-300))
        self.f_k = self._solve(tolerance, step_tolerance, max_iterations)
        self.log_denominator = self._log_denominators(self.f_k)

    def _blocks(self):
        if self._cache is not None:
            yield from self._cache
            return
        for start in range(0, self.n_samples, self._block):
            indices = np.arange(start, min(start + self._block, self.n_samples))
            u = np.asarray(self._energies(indices), dtype=np.float64)
            if u.shape != (self.n_states, indices.size):
                raise ValueError(f"reduced_energies returned shape {u.shape}, expected {(self.n_states, indices.size)}")
            yield indices, u

    def _log_denominators(self, f: np.ndarray) -> np.ndarray:
        """(N,) ln sum_k N_k exp(f_k - u_kn)."""
        out = np.empty(self.n_samples)
        for indices, u in self._blocks():
            out[indices] = _logsumexp0(self._log_n[:, None] + f[:, None] - u)
        return out

    def _objective(self, f: np.ndarray) -> float:
        return float(self._log_denominators(f).sum() - self.n_k @ f)

    def _gradient_hessian(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        column_sums, gram = np.zeros(self.n_states), np.zeros((self.n_states, self.n_states))
        for _, u in self._blocks():
            log_w = f[:, None] - u
            w = np.exp(log_w - _logsumexp0(self._log_n[:, None] + log_w))  # (K, m): W_nk transposed
            column_sums += w.sum(1)
            gram += w @ w.T
        gradient = self.n_k * column_sums - self.n_k
        hessian = np.diag(self.n_k * column_sums) - self.n_k[:, None] * gram * self.n_k[None, :]
        return gradient, hessian

    def _self_consistent(self, f: np.ndarray) -> np.ndarray:
        """f_k = -ln sum_n exp(-u_kn) / sum_j N_j exp(f_j - u_jn), shifted to f_0 = 0: MBAR's fixed point."""
        log_sums = np.full(self.n_states, -np.inf)
        log_d = self._log_denominators(f)
        for indices, u in self._blocks():
            log_sums = np.logaddexp(log_sums, logsumexp(-u - log_d[indices][None, :], axis=1))
        return log_sums[0] - log_sums

    def _solve(self, tolerance: float, step_tolerance: float, max_iterations: int) -> np.ndarray:
        f = np.zeros(self.n_states)
        for _ in range(3):  # self-consistent iterations: robust far from the solution
            f = self._self_consistent(f)
        objective = self._objective(f)
        for _ in range(max_iterations):
            gradient, hessian = self._gradient_hessian(f)
            if np.max(np.abs(gradient)) / self.n_samples < tolerance:
                return self._self_consistent(f)  # also sets the f of states without samples
            step = np.zeros(self.n_states)
            step[1:] = -np.linalg.lstsq(hessian[1:, 1:], gradient[1:], rcond=None)[0]
            if np.max(np.abs(step)) < step_tolerance:  # converged to the objective's floating-point floor
                return self._self_consistent(f + step)
            scale = 1.0
            while scale > 1e-8:
                trial = f + scale * step
                trial_objective = self._objective(trial)
                if trial_objective <= objective + 1e-4 * scale * (gradient @ step):
                    break
                scale /= 2
            else:  # no decrease along the Newton direction: the objective is at its floating-point minimum
                return self._self_consistent(f)
            f, objective = trial, trial_objective
        raise RuntimeError(f"MBAR did not converge in {max_iterations} Newton iterations "
                           f"(largest gradient {np.max(np.abs(gradient)) / self.n_samples:.2e} per sample)")

    def _weights_gram(self, extra_log_weights: np.ndarray | None = None) -> np.ndarray:
        """W'W over the K states and the columns of ``extra_log_weights`` ((n_extra, N) ln W_n of states
        without samples)."""
        n_extra = 0 if extra_log_weights is None else len(extra_log_weights)
        gram = np.zeros((self.n_states + n_extra, self.n_states + n_extra))
        for indices, u in self._blocks():
            w = np.exp(self.f_k[:, None] - u - self.log_denominator[indices][None, :])
            if n_extra:
                w = np.concatenate([w, np.exp(extra_log_weights[:, indices])])
            gram += w @ w.T
        return gram

    @staticmethod
    def _covariance(gram: np.ndarray, n_k: np.ndarray) -> np.ndarray:
        """Theta = V S (I - S V' N V S)^+ S V' from W'W = V S^2 V'."""
        eigenvalues, v = np.linalg.eigh(gram)
        s = np.sqrt(np.clip(eigenvalues, 0.0, None))
        vs = v * s[None, :]
        inner = np.eye(len(s)) - vs.T @ (n_k[:, None] * vs)
        return vs @ np.linalg.pinv(inner, rcond=1e-12, hermitian=True) @ vs.T

    def free_energy_errors(self) -> np.ndarray:
        """(K,) standard errors of f_k - f_0."""
        theta = self._covariance(self._weights_gram(), self.n_k)
        diagonal = np.diag(theta)
        return np.sqrt(np.clip(diagonal + diagonal[0] - 2 * theta[:, 0], 0.0, None))

    def overlap_matrix(self) -> np.ndarray:
        """(K, K) O_ij = N_j sum_n W_ni W_nj: the probability that a sample of state i is attributed to state j."""
        return self._weights_gram() * self.n_k[None, :]

    def region_free_energies(self, masks) -> tuple[np.ndarray, np.ndarray]:
        """Free energies (f_0 = 0) of regions of configuration space given as boolean masks (R, N) over the
        samples, and the (R, R) covariance of their differences' ingredients: returns (f_r, theta_rr) with
        var(f_a - f_b) = theta_aa + theta_bb - 2 theta_ab."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_samples:
            raise ValueError(f"masks must have shape (R, {self.n_samples}), got {masks.shape}")
        log_w = np.where(masks, -self.log_denominator[None, :], -np.inf)  # ln of exp(-u_rn) / denominator_n
        f_r = -logsumexp(log_w, axis=1)
        gram = self._weights_gram(log_w + f_r[:, None])
        theta = self._covariance(gram, np.concatenate([self.n_k, np.zeros(len(masks))]))
        return f_r, theta[self.n_states:, self.n_states:]

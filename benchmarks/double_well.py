"""The paper's double-well experiment (Wu, Köhler & Noé 2020, Fig. 3 / notebook experiment1).

Target u(x, y) = x⁴ − 6x² − 0.5x + 0.5y² (reduced units). Training data: equal numbers of exact
samples from each well (the paper used two MCMC chains, one per well, so the data have the wrong
well populations). Each method is trained by maximum likelihood and then by a mix of maximum
likelihood and reverse KL, then sampled; the free-energy profile along x is −log of the
(unweighted or reweighted) histogram. Over the runs of one method:

* bias = |mean over bins with −2.25 < x < 2.25 of (F_exact − F̄)|, with F_exact and the run-mean
  F̄ each shifted to minimum 0 (the paper's ``bias_uncertainty``); ± is its bootstrap std over runs;
* uncertainty = the std over runs of F per bin, averaged over those bins.

Usage: python benchmarks/double_well.py [--quick] [--runs 10] [--workers 2]
The last line printed is ``best_reweighted_bias_kT=<value>`` (best method with stochastic blocks).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

import numpy as np
import torch

from openmm_snf.flows import DoubleWellEnergy, build_snf
from openmm_snf.train import TrainConfig, Trainer

METHODS = {
    "RNVP": dict(flow="realnvp", stochastic=None),
    "RNVP+MC": dict(flow="realnvp", stochastic="mc"),
    "NSF": dict(flow="spline", stochastic=None),
    "NSF+MC": dict(flow="spline", stochastic="mc"),
}
#: The paper's notebook: reweighted bias (± std) and uncertainty in kT.
PAPER = {"RNVP+MC": (0.15, 0.08, 0.61), "NSF+MC": (0.076, 0.073, 0.59)}
EDGES = np.linspace(-3.0, 3.0, 61)
CENTERS = 0.5 * (EDGES[1:] + EDGES[:-1])
WINDOW = (CENTERS > -2.25) & (CENTERS < 2.25)


class CountingEnergy(torch.nn.Module):
    """The double well, counting per-sample energy evaluations."""

    def __init__(self):
        super().__init__()
        self.inner, self.count = DoubleWellEnergy(), 0

    def forward(self, x):
        self.count += x.shape[0]
        return self.inner(x)


def well_data(n: int, seed: int) -> torch.Tensor:
    """n/2 exact samples from each well (x < 0 and x > 0), y ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-3.5, 3.5, 200001)
    p = np.exp(-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid))
    xs = []
    for side in (grid < 0, grid > 0):
        cdf = np.cumsum(np.where(side, p, 0.0))
        cdf /= cdf[-1]
        xs.append(np.interp(rng.random(n // 2), cdf, grid))
    x = np.concatenate(xs)
    return torch.as_tensor(np.stack([x, rng.normal(size=x.size)], 1), dtype=torch.float32)


def profile(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    hist, _ = np.histogram(x, bins=EDGES, weights=weights, density=True)
    with np.errstate(divide="ignore"):
        return -np.log(hist)


def one_run(args) -> dict:
    method, seed, settings = args
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    energy = CountingEnergy()
    snf = build_snf(2, None, energy, n_blocks=3, hidden=(64, 64, 64), n_steps=20, step_size=0.25,
                    **METHODS[method])
    data = well_data(settings["n_data"], seed)
    stages = [TrainConfig(n_iterations=settings["iterations"], batch_size=256, learning_rate=1e-3,
                          ess_every=0, seed=seed),
              TrainConfig(n_iterations=settings["iterations"], batch_size=256, learning_rate=3e-4,
                          weight_forward=0.5, weight_reverse=0.5, seed=seed + 1000)]
    start = time.perf_counter()
    for config in stages:
        Trainer(snf, config, data=data, progress=False).train()
    training_evals = energy.count
    energy.count = 0
    sample = snf.sample(settings["n_samples"], generator=torch.Generator().manual_seed(seed))
    x = sample.x[:, 0].numpy()
    w = torch.softmax(sample.log_weights, 0).numpy()
    return {"method": method, "unweighted": profile(x), "reweighted": profile(x, w),
            "ess_fraction": sample.ess / settings["n_samples"], "train_evals": training_evals,
            "sample_evals_per_sample": energy.count / settings["n_samples"],
            "seconds": time.perf_counter() - start}


def bias_uncertainty(profiles: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """(bias, bootstrap std of bias, uncertainty) of profiles (n_runs, n_bins), paper's definition."""
    exact = CENTERS ** 4 - 6 * CENTERS ** 2 - 0.5 * CENTERS
    exact = exact - exact.min()

    def bias(rows):
        mean = rows.mean(0)
        mean = mean - mean[np.isfinite(mean)].min()
        ok = WINDOW & np.isfinite(mean)
        return abs(float((exact - mean)[ok].mean()))

    finite_cols = WINDOW & np.isfinite(profiles).all(0)
    uncertainty = float(profiles[:, finite_cols].std(0).mean())
    boots = [bias(profiles[rng.integers(0, len(profiles), len(profiles))]) for _ in range(200)]
    return bias(profiles), float(np.std(boots)), uncertainty


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs, short training, fewer samples")
    parser.add_argument("--runs", type=int, default=None, help="runs per method (default 10, quick 2)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 10)
    settings = (dict(iterations=150, n_data=4000, n_samples=10000) if args.quick
                else dict(iterations=500, n_data=20000, n_samples=50000))
    jobs = [(method, seed, settings) for method in METHODS for seed in range(runs)]
    with mp.get_context("spawn").Pool(max(1, args.workers)) as pool:
        results = pool.map(one_run, jobs)

    rng = np.random.default_rng(0)
    print(f"double well, {runs} runs per method, {settings['iterations']}+{settings['iterations']} iterations, "
          f"{settings['n_samples']} samples per run; free energies in kT")
    header = (f"{'method':<9} {'bias unw.':>10} {'unc. unw.':>10} {'bias rew.':>15} {'unc. rew.':>10} "
              f"{'ESS/N':>7} {'E/sample':>9} {'train E':>9} {'paper bias rew.':>16} {'paper unc.':>10}")
    print(header)
    best = math.inf
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        b_u, _, u_u = bias_uncertainty(np.stack([r["unweighted"] for r in rows]), rng)
        b_w, b_sd, u_w = bias_uncertainty(np.stack([r["reweighted"] for r in rows]), rng)
        paper = PAPER.get(method)
        paper_bias = f"{paper[0]:.3f} ± {paper[1]:.3f}" if paper else "-"
        paper_unc = f"{paper[2]:.2f}" if paper else "-"
        print(f"{method:<9} {b_u:>10.3f} {u_u:>10.3f} {b_w:>8.3f} ± {b_sd:.3f} {u_w:>10.3f} "
              f"{np.mean([r['ess_fraction'] for r in rows]):>7.3f} "
              f"{rows[0]['sample_evals_per_sample']:>9.0f} {rows[0]['train_evals']:>9.2e} "
              f"{paper_bias:>16} {paper_unc:>10}")
        if METHODS[method]["stochastic"] is not None:
            best = min(best, b_w)
    print(f"best_reweighted_bias_kT={best:.4f}")
    return best


if __name__ == "__main__":
    main()

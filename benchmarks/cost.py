"""Training cost of the SNF paper's alanine dipeptide configuration, with Metropolis and with Langevin blocks.

The paper's own code takes about 3 s per iteration on a 2-core CPU for this configuration (1.7 s of it
in OpenMM, 13,300 energy evaluations per iteration, one at a time): about 50 minutes for its 1000
iterations. This script trains, on the same machine, in one run:

* ``paper``: :data:`~openmm_snf.flows.PAPER_ALANINE_DIPEPTIDE` (5 RealNVP blocks, hidden [128, 128, 128],
  66 auxiliary momenta, a Metropolis block of 20 steps after each, λ = 0, .25, .5, .75, 1), maximum
  likelihood on MD data at 1000 K, batch 128, Adam 1e-3;
* ``mala``: the same with Metropolis-adjusted Langevin blocks (20 steps of ``--langevin-step``; forces and
  energies from one batched call);
* ``langevin`` (with ``--kinds``): unadjusted overdamped Langevin blocks (forces only; its weights
  collapsed onto single samples in every run so far);

timing every iteration and counting energy evaluations, then draws ``--samples`` weighted samples from
each and reports the Kish ESS and the reweighted KL of the phi/psi marginals against the MD reference
of ``quality.py``, trained on its MD training frames (both cached in ``benchmarks/cache/``; computed on
first use, ~20 minutes).

The last line is ``paper_config_speedup=<3 s / our seconds per iteration>`` (target: >= 3).

Usage:  python benchmarks/cost.py [--iterations 1000] [--samples 10000] [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch

from openmm_snf import load_system
from openmm_snf.coordinates import InternalCoordinateTransform
from openmm_snf.energy import OpenMMEnergy, linlogcut
from openmm_snf.flows import PAPER_ALANINE_DIPEPTIDE, build_snf
from openmm_snf.train import TrainConfig, Trainer
from quality import (CountingEnergy, draw, evaluate, parse_args as quality_args, reference, resolve_sizes,
                     training_frames)

PAPER_SECONDS_PER_ITERATION = 3.0  # the paper's code on this 2-core machine (issue text)


def train_and_sample(mol, data, stochastic: str, args, ref) -> dict:
    energy = CountingEnergy(OpenMMEnergy(mol))
    transform = InternalCoordinateTransform.from_system(mol, data[:: max(1, len(data) // 2000)], scheme="mixed")
    settings = dict(PAPER_ALANINE_DIPEPTIDE, stochastic=stochastic)
    if stochastic in ("mala", "langevin"):
        settings["step_size"] = args.langevin_step
    torch.manual_seed(args.seed)
    snf = build_snf(transform.dim, transform.periodic_mask, energy, transform, **settings)
    config = TrainConfig(n_iterations=args.iterations, batch_size=128, learning_rate=1e-3, ess_every=0,
                         seed=args.seed)
    start = time.perf_counter()
    Trainer(snf, config, data=torch.as_tensor(data, dtype=torch.float32),
            energy_regularizer=lambda u: linlogcut(u, high=500.0, max=1e4), progress=args.progress).train()
    train_s, evaluations = time.perf_counter() - start, energy.count
    row = evaluate(mol, ref, draw(mol, snf, energy, args.samples, args.seed))
    return dict(row, s_per_it=train_s / args.iterations, evals_per_it=evaluations / args.iterations,
                train_min=train_s / 60)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--langevin-step", type=float, default=0.005, help="MALA / Langevin step ε (latent units)")
    parser.add_argument("--kinds", nargs="+", choices=("mc", "mala", "langevin"), default=["mc", "mala"],
                        help="stochastic blocks to train (mc is always run: the speedup is measured on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="30 iterations, 2000 samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.samples = 30, 2000
    torch.set_num_threads(1)
    mol = load_system("alanine_dipeptide_vacuum")
    settings = quality_args(["--reference", "md"] + (["--quick"] if args.quick else []))
    resolve_sizes(settings, mol.temperature)
    ref = reference(mol, settings)
    data, _ = training_frames(mol, settings)
    kinds = ["mc"] + [kind for kind in args.kinds if kind != "mc"]
    rows = {kind: train_and_sample(mol, data, kind, args, ref) for kind in kinds}
    print(f"\nALDP vacuum 1000 K, the paper's model (5 RealNVP blocks [128,128,128], 66 aux dims), ML on "
          f"{len(data)} MD frames, batch 128, {args.iterations} iterations; {args.samples} samples")
    print(f"{'stochastic blocks':<22}{'s/iteration':>12}{'min/1000 it':>12}{'evals/it':>10}{'ESS %':>8}"
          f"{'KL phi rew':>11}{'KL psi rew':>11}{'dF [95%] kT':>26}")
    for kind, row in rows.items():
        df, low, high = row["df"]
        print(f"{kind:<22}{row['s_per_it']:>12.3f}{row['s_per_it'] * 1000 / 60:>12.1f}{row['evals_per_it']:>10.0f}"
              f"{row['ess_pct']:>8.2f}{row['kl_phi_rew']:>11.4f}{row['kl_psi_rew']:>11.4f}"
              f"{f'{df:.2f} [{low:.2f}, {high:.2f}]':>26}")
    print(f"{'paper code (issue)':<22}{PAPER_SECONDS_PER_ITERATION:>12.3f}{PAPER_SECONDS_PER_ITERATION * 1000 / 60:>12.1f}"
          f"{13300:>10d}")
    print(f"reference dF = {ref['delta_f']:.3f} [{ref['ci_low']:.3f}, {ref['ci_high']:.3f}] kT")
    for kind in kinds[1:]:
        print(f"{kind}_minutes_per_1000_iterations={rows[kind]['s_per_it'] * 1000 / 60:.2f}")
    print(f"paper_config_speedup={PAPER_SECONDS_PER_ITERATION / rows['mc']['s_per_it']:.2f}")


if __name__ == "__main__":
    main()

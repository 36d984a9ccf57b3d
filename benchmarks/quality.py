"""Sampling quality of a flow-only baseline and an SNF against an exact reference (alanine dipeptide).

For one system this script

1. makes (or reads from ``benchmarks/cache/``) a reference: plain MD with many replicas in one Context
   (``--reference md``, right for ALDP vacuum at 1000 K) or umbrella sampling along phi analysed with
   MBAR (``--reference umbrella``, the default for systems at 300 K, where phi > 0 is rare); its
   ΔF(phi > 0 vs phi < 0) has a 95% interval (block bootstrap for MD, MBAR's analytic error for umbrella);
2. trains a flow-only baseline (RealNVP couplings, ``stochastic=None``) and the SNF (the same couplings
   with Metropolis blocks in between) by maximum likelihood on MD data (plus an optional mixed
   forward/reverse-KL stage), counting every per-sample energy evaluation with a small wrapper;
3. samples both; the baseline draws as many samples as the SNF's sampling spent energy evaluations
   (capped by ``--max-baseline-samples``), so both sample at about the same cost; with ``--anneal K``
   (default 80) the trained baseline flow is also refined by annealed importance sampling
   (:func:`~openmm_snf.flows.annealed`: K Metropolis stages in its prior space, exact weights);
4. prints one table: KL(reference || model) of the phi and psi marginals (64 bins on [−π, π)),
   reweighted and unweighted, Kish ESS in %, ΔF with its 95% bootstrap interval next to the
   reference's, wall times and energy evaluations, and the SNF paper's KL numbers beside them.

Usage:
    python benchmarks/quality.py [--system alanine_dipeptide_vacuum] [--quick] [--iterations N] ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import mdtraj
import numpy as np
import torch

from openmm_snf import load_system
from openmm_snf.analysis import compute_cvs, free_energy_difference, histogram_kl_divergence
from openmm_snf.analysis.umbrella import umbrella_mbar
from openmm_snf.coordinates import InternalCoordinateTransform
from openmm_snf.energy import OpenMMEnergy, linlogcut
from openmm_snf.flows import annealed, build_snf
from openmm_snf.md import MDSettings, UmbrellaBias, run_md
from openmm_snf.train import TrainConfig, Trainer
from openmm_snf.weights import kish_ess

CACHE = Path(__file__).resolve().parent / "cache"
#: SNF paper (Wu, Köhler & Noé 2020), alanine dipeptide torsion-marginal KL, RNVP -> RNVP+MC.
PAPER_KL = {"phi": (1.69, 0.36), "psi": (0.98, 0.27)}


class CountingEnergy:
    """Wraps an energy model and counts per-sample evaluations (every call costs one per sample)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.count += int(x.shape[0])
        return self.inner(x)


def torsions(mol, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi, psi (n,) radians of frames (n, n_atoms, 3) nm."""
    traj = mdtraj.Trajectory(np.asarray(xyz, dtype=np.float32), mol.mdtraj_topology())
    values = compute_cvs(traj, ["phi", "psi"], cvs=mol.cvs)
    return values["phi"].astype(np.float64), values["psi"].astype(np.float64)


def md_reference(mol, args) -> dict:
    """Plain replica MD: frames are Boltzmann samples; ΔF by a block bootstrap over consecutive frames."""
    settings = MDSettings(n_frames=args.reference_frames, steps_per_frame=250, n_replicas=args.reference_replicas,
                          equilibration_steps=5000, seed=11)
    frames = run_md(mol, settings).reshape(-1, mol.n_atoms, 3)
    phi, psi = torsions(mol, frames)
    return dict(xyz=frames.astype(np.float32), phi=phi, psi=psi, log_weights=np.zeros(len(phi)),
                block_length=settings.n_frames,
                method=f"MD {settings.n_replicas} replicas x {settings.n_frames} frames x 250 fs, "
                       "bootstrap over blocks of one replica's length")


def md_delta_f(ref: dict) -> dict:
    """ΔF of MD frames with a block bootstrap whose blocks are as long as one replica: at 1000 K phi
    changes state on the time scale of a replica's run, so shorter blocks understate the error."""
    phi = ref["phi"]
    result = free_energy_difference(np.zeros(len(phi)), phi > 0, phi < 0, labels=("phi>0", "phi<0"),
                                    block_length=int(ref["block_length"]))
    return dict(delta_f=result.delta_f, ci_low=result.ci_low, ci_high=result.ci_high)


def umbrella_reference(mol, args) -> dict:
    """Umbrella windows along phi (one per replica) + MBAR; training data from a short unbiased MD."""
    n_windows = args.reference_replicas
    centers = np.linspace(-np.pi, np.pi, n_windows, endpoint=False)
    bias = UmbrellaBias("dihedral", mol.cvs["phi"]["atoms"], centers, args.umbrella_k)
    frames = run_md(mol, MDSettings(n_frames=args.reference_frames, steps_per_frame=100, n_replicas=n_windows,
                                    equilibration_steps=5000, seed=11), bias=bias)
    phi, psi = torsions(mol, frames.reshape(-1, mol.n_atoms, 3))
    analysis = umbrella_mbar(phi.reshape(n_windows, -1), bias)
    result = analysis.delta_f(phi > 0, phi < 0, labels=("phi>0", "phi<0"))
    data = run_md(mol, MDSettings(n_frames=500, steps_per_frame=250, n_replicas=16, seed=12))
    return dict(xyz=data.reshape(-1, mol.n_atoms, 3).astype(np.float32), phi=phi, psi=psi,
                log_weights=analysis.log_weights, delta_f=result.delta_f, ci_low=result.ci_low,
                ci_high=result.ci_high,
                method=f"umbrella sampling along phi, {n_windows} windows x {args.reference_frames} frames x 100 fs, "
                       f"k = {args.umbrella_k:g} kT/rad^2, MBAR")


def reference(mol, args) -> dict:
    """The cached reference for these settings, computed (and timed) if missing."""
    name = f"{mol.name}_{args.reference}_{args.reference_replicas}x{args.reference_frames}"
    if args.reference == "umbrella":
        name += f"_k{args.umbrella_k:g}"
    path = CACHE / f"{name}.npz"
    if path.is_file():
        with np.load(path) as stored:
            ref = {key: stored[key] if stored[key].ndim else stored[key].item() for key in stored.files}
        ref.setdefault("block_length", args.reference_frames)   # caches written before it was stored
    else:
        start = time.perf_counter()
        ref = md_reference(mol, args) if args.reference == "md" else umbrella_reference(mol, args)
        ref["wall_s"] = time.perf_counter() - start
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, **ref)
    if args.reference == "md":
        ref.update(md_delta_f(ref))
    return ref


def build_model(mol, energy, data: np.ndarray, stochastic: str | None, args):
    transform = InternalCoordinateTransform.from_system(mol, data[:: max(1, len(data) // 2000)], scheme="mixed")
    torch.manual_seed(args.seed)
    return build_snf(transform.dim, transform.periodic_mask, energy, transform, n_blocks=args.blocks,
                     flow="realnvp", hidden=tuple(args.hidden), stochastic=stochastic, n_steps=args.mc_steps,
                     step_size=args.step_size, augment=args.augment)


def train_and_sample(mol, inner_energy, data, stochastic, args, n_samples=None) -> dict:
    """Train one model, then draw samples; returns samples, weights, evaluation counts and wall times."""
    energy = CountingEnergy(inner_energy)
    snf = build_model(mol, energy, data, stochastic, args)
    stages = [TrainConfig(n_iterations=args.iterations, batch_size=128, learning_rate=1e-3, ess_every=0,
                          seed=args.seed)]
    if args.reverse_iterations:
        stages.append(TrainConfig(n_iterations=args.reverse_iterations, batch_size=128, learning_rate=3e-4,
                                  weight_forward=0.5, weight_reverse=0.5, ess_every=0, seed=args.seed + 1))
    start = time.perf_counter()
    for config in stages:
        Trainer(snf, config, data=torch.as_tensor(data, dtype=torch.float32),
                energy_regularizer=lambda u: linlogcut(u, high=500.0, max=1e4), progress=args.progress).train()
    train_s, train_evals = time.perf_counter() - start, energy.count
    return dict(draw(mol, snf, energy, n_samples or args.samples, args.seed), train_s=train_s,
                train_evals=train_evals, snf=snf, energy=energy)


def draw(mol, snf, energy: CountingEnergy, n: int, seed: int) -> dict:
    """n weighted samples of ``snf`` (non-finite weights dropped and counted), with their cost."""
    energy.count = 0
    generator = torch.Generator().manual_seed(seed + 7)
    start = time.perf_counter()
    xyz, log_w = [], []
    for first in range(0, n, 2048):
        batch = snf.sample(min(2048, n - first), generator=generator)
        xyz.append(batch.x.reshape(-1, mol.n_atoms, 3).double().numpy())
        log_w.append(batch.log_weights.numpy())
    xyz, log_w = np.concatenate(xyz), np.concatenate(log_w)
    finite = np.isfinite(log_w)
    return dict(xyz=xyz[finite], log_weights=log_w[finite], n_nonfinite=int((~finite).sum()),
                sample_s=time.perf_counter() - start, sample_evals=energy.count, n=n)


def evaluate(mol, ref: dict, run: dict) -> dict:
    phi, psi = torsions(mol, run["xyz"])
    log_w = run["log_weights"]
    row = {}
    for name, values, ref_values in (("phi", phi, ref["phi"]), ("psi", psi, ref["psi"])):
        for label, weights in (("rew", log_w), ("unw", None)):
            row[f"kl_{name}_{label}"] = histogram_kl_divergence(ref_values, values,
                                                                reference_log_weights=ref["log_weights"],
                                                                log_weights=weights, bins=64)
    row["ess_pct"] = 100 * kish_ess(log_w) / len(log_w)
    try:
        result = free_energy_difference(log_w, phi > 0, phi < 0, labels=("phi>0", "phi<0"), n_bootstrap=500)
        row["df"] = (result.delta_f, result.ci_low, result.ci_high)
    except ValueError:  # a state without samples
        row["df"] = (np.nan, np.nan, np.nan)
    return row


def print_table(mol, ref: dict, rows: dict, runs: dict, args) -> None:
    print(f"\n{mol.name} at {mol.temperature:g} K; reference: {ref['method']} "
          f"({len(ref['phi'])} frames, {ref['wall_s']:.0f} s)")
    print(f"model: {args.blocks} RealNVP blocks, hidden {args.hidden}, augment {args.augment}; SNF: Metropolis "
          f"blocks of {args.mc_steps} steps (step {args.step_size}) after each; ML {args.iterations} it"
          + (f" + ML/KL {args.reverse_iterations} it" if args.reverse_iterations else "") + ", batch 128")
    head = (f"{'':<14}{'KL phi rew':>11}{'KL psi rew':>11}{'KL phi unw':>11}{'KL psi unw':>11}{'ESS %':>8}"
            f"{'dF(phi>0 - phi<0) [95%] kT':>30}{'train s':>9}{'sample s':>9}{'train E':>10}{'sample E':>10}"
            f"{'samples':>9}")
    print(head)
    for name, row in rows.items():
        run = runs[name]
        df, low, high = row["df"]
        print(f"{name:<14}{row['kl_phi_rew']:>11.4f}{row['kl_psi_rew']:>11.4f}{row['kl_phi_unw']:>11.4f}"
              f"{row['kl_psi_unw']:>11.4f}{row['ess_pct']:>8.2f}{f'{df:.3f} [{low:.3f}, {high:.3f}]':>30}"
              f"{run['train_s']:>9.0f}{run['sample_s']:>9.0f}{run['train_evals']:>10.3g}{run['sample_evals']:>10.3g}"
              f"{len(run['log_weights']):>9}")
    ref_df = f"{ref['delta_f']:.3f} [{ref['ci_low']:.3f}, {ref['ci_high']:.3f}]"
    print(f"{'reference':<14}{'':>52}{ref_df:>30}")
    print(f"{'paper RNVP':<14}{PAPER_KL['phi'][0]:>11.2f}{PAPER_KL['psi'][0]:>11.2f}   (paper's own KL metric)")
    print(f"{'paper SNF':<14}{PAPER_KL['phi'][1]:>11.2f}{PAPER_KL['psi'][1]:>11.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", default="alanine_dipeptide_vacuum")
    parser.add_argument("--quick", action="store_true", help="a ~5-minute smoke run (small reference, short training)")
    parser.add_argument("--reference", choices=("md", "umbrella"), default=None,
                        help="default: md above 500 K, umbrella otherwise")
    parser.add_argument("--reference-replicas", type=int, default=None, help="replicas (umbrella: windows)")
    parser.add_argument("--reference-frames", type=int, default=None, help="frames per replica")
    parser.add_argument("--umbrella-k", type=float, default=100.0, help="umbrella force constant, kT/rad^2")
    parser.add_argument("--iterations", type=int, default=None, help="maximum-likelihood iterations")
    parser.add_argument("--reverse-iterations", type=int, default=None, help="extra ML + reverse-KL iterations")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--augment", type=int, default=0)
    parser.add_argument("--mc-steps", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=None, help="SNF samples")
    parser.add_argument("--anneal", type=int, default=80,
                        help="also refine the baseline flow by annealed importance sampling with this many "
                             "stages of 2 Metropolis steps (0: skip)")
    parser.add_argument("--max-baseline-samples", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(reference_replicas=32 if quick else 64, reference_frames=200 if quick else 600,
                    iterations=100 if quick else 500, reverse_iterations=0 if quick else 200,
                    samples=2000 if quick else 10000)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    mol = load_system(args.system)
    if args.reference is None:
        args.reference = "md" if mol.temperature > 500 else "umbrella"
    ref = reference(mol, args)
    data = np.asarray(ref["xyz"], dtype=np.float64)
    energy = OpenMMEnergy(mol)
    runs = {"RNVP (flow)": None, "RNVP+MC (SNF)": None}
    runs["RNVP+MC (SNF)"] = train_and_sample(mol, energy, data, "mc", args)
    snf_cost = runs["RNVP+MC (SNF)"]["sample_evals"]
    runs["RNVP (flow)"] = train_and_sample(mol, energy, data, None, args,
                                           n_samples=min(snf_cost, args.max_baseline_samples))
    if args.anneal:  # the baseline flow refined by annealed importance sampling (exact weights)
        flow = runs["RNVP (flow)"]
        runs[f"RNVP+AIS({args.anneal})"] = dict(draw(mol, annealed(flow["snf"], args.anneal), flow["energy"],
                                                     args.samples, args.seed), train_s=flow["train_s"],
                                                train_evals=flow["train_evals"])
    rows = {name: evaluate(mol, ref, run) for name, run in runs.items()}
    print_table(mol, ref, rows, runs, args)
    return rows


if __name__ == "__main__":
    main()

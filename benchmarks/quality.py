"""Sampling quality of flow-only baselines and annealed SNFs against an exact reference (alanine dipeptide).

For one system this script

1. makes (or reads from ``benchmarks/cache/``) a reference: plain MD with many replicas in one Context
   (``--reference md``, right for ALDP vacuum at 1000 K; block bootstrap over replicas) or umbrella
   sampling along phi analysed with MBAR (``--reference umbrella``, the default below 500 K, where
   phi > 0 is rare; MBAR's analytic error); its ΔF(phi > 0 vs phi < 0) has a 95% interval;
2. makes independent training frames the same way (another seed; cached): plain MD, or the umbrella
   windows' frames used *unweighted* (the flow then learns a distribution broader than the target
   along phi, which covers the rare state; the importance weights undo the difference exactly);
3. trains a RealNVP flow and a spline flow of the same size (``stochastic=None``) by maximum likelihood
   on those frames (cached model weights);
4. samples each flow alone and as the SNF :func:`~openmm_snf.flows.annealed` makes of it (K Metropolis
   stages in its prior space before the flow, exact weights; for the spline flow also with MALA
   stages, i.e. Langevin steps that use forces); the flow alone draws as many samples as its annealed
   SNF spent energy evaluations (capped by ``--max-baseline-samples``), so each pair is compared at
   the same sampling cost ("same E"), and its first ``--samples`` of them at the same sample count;
5. prints one table: KL(reference || model) of the phi and psi marginals (64 bins on [−π, π)),
   reweighted and unweighted, Kish ESS in % of the samples, ΔF with its 95% bootstrap interval next to
   the reference's, wall times, energy evaluations, and the SNF paper's KL numbers beside them.

``--end-to-end`` adds the paper's kind of SNF (RealNVP with Metropolis blocks between the couplings,
trained end to end; slower to train and, on these systems, worse than annealing a flow).

Usage:
    python benchmarks/quality.py [--system alanine_dipeptide_vacuum] [--quick] [--samples N] ...
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
#: (replicas, frames per replica, MD steps of 1 fs per frame) by (method, --quick). The full MD reference
#: (96 million replica steps, 25 min on 2 cores) has a ΔF interval below 0.1 kT at 1000 K; the umbrella
#: one 240 ps per window.
REFERENCE_SIZES = {("md", False): (128, 1500, 500), ("md", True): (32, 200, 250),
                   ("umbrella", False): (64, 2400, 100), ("umbrella", True): (32, 200, 100)}
#: Training frames by (method, --quick): 192,000 MD frames (the flows were data-limited with 38,400).
DATA_SIZES = {("md", False): (64, 3000, 50), ("md", True): (32, 500, 50),
              ("umbrella", False): (64, 1500, 50), ("umbrella", True): (32, 300, 50)}


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


def umbrella_bias(mol, n_windows: int, k: float) -> UmbrellaBias:
    """One harmonic window along phi per replica, centres evenly spaced on [−π, π)."""
    centers = np.linspace(-np.pi, np.pi, n_windows, endpoint=False)
    return UmbrellaBias("dihedral", mol.cvs["phi"]["atoms"], centers, k)


def simulate(mol, method: str, size: tuple[int, int, int], seed: int, umbrella_k: float) -> np.ndarray:
    """Frames (replicas, frames, atoms, 3) of plain MD or of umbrella windows along phi."""
    replicas, frames, steps = size
    settings = MDSettings(n_frames=frames, steps_per_frame=steps, n_replicas=replicas, equilibration_steps=5000,
                          seed=seed)
    return run_md(mol, settings, bias=umbrella_bias(mol, replicas, umbrella_k) if method == "umbrella" else None)


def cached(name: str, compute) -> dict:
    """The arrays stored under ``benchmarks/cache/NAME.npz``, computed (and timed) if missing."""
    path = CACHE / f"{name}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {key: stored[key] if stored[key].ndim else stored[key].item() for key in stored.files}
    start = time.perf_counter()
    arrays = compute()
    arrays["wall_s"] = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def reference(mol, args) -> dict:
    """phi, psi and log weights of the reference frames, and its ΔF(phi > 0 vs phi < 0) with 95% interval."""
    replicas, frames, steps = args.reference_size
    name = f"{mol.name}_{args.reference}_{replicas}x{frames}"
    if args.reference == "umbrella":
        name += f"_k{args.umbrella_k:g}"
    elif steps != 250:
        name += f"x{steps}"

    def compute() -> dict:
        xyz = simulate(mol, args.reference, args.reference_size, 11, args.umbrella_k)
        phi, psi = torsions(mol, xyz.reshape(-1, mol.n_atoms, 3))
        if args.reference == "md":
            return dict(phi=phi, psi=psi, log_weights=np.zeros(len(phi)))
        analysis = umbrella_mbar(phi.reshape(replicas, -1), umbrella_bias(mol, replicas, args.umbrella_k))
        result = analysis.delta_f(phi > 0, phi < 0, labels=("phi>0", "phi<0"))
        return dict(phi=phi, psi=psi, log_weights=analysis.log_weights, delta_f=result.delta_f,
                    ci_low=result.ci_low, ci_high=result.ci_high)

    ref = cached(name, compute)
    if args.reference == "md":
        # at 1000 K phi changes state on the time scale of a replica's run, so the bootstrap blocks are
        # whole replicas (shorter blocks would understate the error)
        phi = ref["phi"]
        result = free_energy_difference(np.zeros(len(phi)), phi > 0, phi < 0, labels=("phi>0", "phi<0"),
                                        block_length=frames)
        ref.update(delta_f=result.delta_f, ci_low=result.ci_low, ci_high=result.ci_high,
                   method=f"MD {replicas} replicas x {frames} frames x {steps} fs, bootstrap over replicas")
    else:
        ref["method"] = (f"umbrella sampling along phi, {replicas} windows x {frames} frames x {steps} fs, "
                         f"k = {args.umbrella_k:g} kT/rad^2, MBAR")
    return ref


def training_frames(mol, args) -> tuple[np.ndarray, str]:
    """Training frames (n, atoms, 3) independent of the reference (another seed), and their description."""
    replicas, frames, steps = args.data_size
    name = f"{mol.name}_data_{args.reference}_{replicas}x{frames}x{steps}"
    data = cached(name, lambda: dict(xyz=simulate(mol, args.reference, args.data_size, 12, args.umbrella_k)
                                     .reshape(-1, mol.n_atoms, 3).astype(np.float32)))
    kind = "MD" if args.reference == "md" else "umbrella windows along phi (unweighted)"
    return np.asarray(data["xyz"], dtype=np.float64), f"{kind}, {replicas} x {frames} frames every {steps} fs"


def build_model(mol, energy, data: np.ndarray, flow: str, stochastic: str | None, args):
    transform = InternalCoordinateTransform.from_system(mol, data[:: max(1, len(data) // 2000)], scheme="mixed")
    torch.manual_seed(args.seed)
    return build_snf(transform.dim, transform.periodic_mask, energy, transform, n_blocks=args.blocks, flow=flow,
                     hidden=tuple(args.hidden), stochastic=stochastic, n_steps=args.mc_steps,
                     step_size=args.step_size)


def train(mol, energy: CountingEnergy, data: np.ndarray, flow: str, stochastic: str | None, args) -> dict:
    """A model trained by maximum likelihood on ``data`` (weights cached); its training time and evaluations."""
    snf = build_model(mol, energy, data, flow, stochastic, args)
    iterations = args.end_to_end_iterations if stochastic else args.iterations
    blocks = f"{stochastic}{args.mc_steps}x{args.step_size:g}" if stochastic else "None"
    path = CACHE / (f"{mol.name}_model_{args.reference}_{len(data)}_{flow}_{blocks}_{args.blocks}x"
                    f"{'-'.join(map(str, args.hidden))}_{iterations}it_batch{args.batch_size}_seed{args.seed}.pt")
    if path.is_file():
        stored = torch.load(path)
        snf.load_state_dict(stored["state"])
        return dict(snf=snf, train_s=stored["train_s"], train_evals=stored["train_evals"])
    config = TrainConfig(n_iterations=iterations, batch_size=args.batch_size, learning_rate=1e-3,
                         lr_schedule="cosine", ess_every=0, seed=args.seed)
    energy.count = 0
    start = time.perf_counter()
    Trainer(snf, config, data=torch.as_tensor(data, dtype=torch.float32),
            energy_regularizer=lambda u: linlogcut(u, high=500.0, max=1e4), progress=args.progress).train()
    result = dict(snf=snf, train_s=time.perf_counter() - start, train_evals=energy.count)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state=snf.state_dict(), train_s=result["train_s"], train_evals=result["train_evals"]), path)
    return result


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


def first_samples(run: dict, n: int) -> dict:
    """The first n samples of a flow's run (what drawing n would have given) and their share of its cost."""
    share = min(n, len(run["log_weights"])) / len(run["log_weights"])
    return dict(run, xyz=run["xyz"][:n], log_weights=run["log_weights"][:n], sample_s=run["sample_s"] * share,
                sample_evals=round(run["sample_evals"] * share))


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


def print_table(mol, ref: dict, data_method: str, rows: dict, runs: dict, args) -> None:
    print(f"\n{mol.name} at {mol.temperature:g} K; reference: {ref['method']} "
          f"({len(ref['phi'])} frames, {ref['wall_s']:.0f} s)")
    print(f"training data: {data_method}; flows: {args.blocks} blocks, hidden {args.hidden}, ML {args.iterations} "
          f"it, batch {args.batch_size}, cosine rate; +AIS(K): K Metropolis stages of 2 steps (0.2) before the flow"
          + (f"; +MALA(K): the same with MALA steps (ε = {args.mala_step:g})" if args.mala_step else "")
          + (f"; SNF (end to end): Metropolis blocks of {args.mc_steps} steps ({args.step_size}) between RealNVP "
             f"couplings, {args.end_to_end_iterations} it" if args.end_to_end else ""))
    head = (f"{'':<20}{'KL phi rew':>11}{'KL psi rew':>11}{'KL phi unw':>11}{'KL psi unw':>11}{'ESS %':>8}"
            f"{'dF(phi>0 - phi<0) [95%] kT':>30}{'train s':>9}{'sample s':>9}{'train E':>10}{'sample E':>10}"
            f"{'samples':>9}")
    print(head)
    for name, row in rows.items():
        run = runs[name]
        df, low, high = row["df"]
        print(f"{name:<20}{row['kl_phi_rew']:>11.4f}{row['kl_psi_rew']:>11.4f}{row['kl_phi_unw']:>11.4f}"
              f"{row['kl_psi_unw']:>11.4f}{row['ess_pct']:>8.2f}{f'{df:.3f} [{low:.3f}, {high:.3f}]':>30}"
              f"{run['train_s']:>9.0f}{run['sample_s']:>9.0f}{run['train_evals']:>10.3g}{run['sample_evals']:>10.3g}"
              f"{len(run['log_weights']):>9}")
    ref_df = f"{ref['delta_f']:.3f} [{ref['ci_low']:.3f}, {ref['ci_high']:.3f}]"
    print(f"{'reference':<20}{'':>52}{ref_df:>30}")
    print(f"{'paper RNVP':<20}{PAPER_KL['phi'][0]:>11.2f}{PAPER_KL['psi'][0]:>11.2f}   (paper's own KL metric)")
    print(f"{'paper SNF':<20}{PAPER_KL['phi'][1]:>11.2f}{PAPER_KL['psi'][1]:>11.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", default="alanine_dipeptide_vacuum")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small reference and training data, short training, few samples")
    parser.add_argument("--reference", choices=("md", "umbrella"), default=None,
                        help="default: md above 500 K, umbrella otherwise; training data are made the same way")
    parser.add_argument("--reference-size", type=int, nargs=3, default=None, metavar=("REPLICAS", "FRAMES", "STEPS"),
                        help="reference replicas (umbrella: windows), frames per replica, 1-fs steps per frame")
    parser.add_argument("--data-size", type=int, nargs=3, default=None, metavar=("REPLICAS", "FRAMES", "STEPS"),
                        help="training data, the same way")
    parser.add_argument("--umbrella-k", type=float, default=100.0, help="umbrella force constant, kT/rad^2")
    parser.add_argument("--iterations", type=int, default=None, help="maximum-likelihood iterations of the flows")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--anneal", type=int, default=80, help="annealing stages K of the +AIS rows")
    parser.add_argument("--mala-step", type=float, default=0.05,
                        help="Langevin step ε of the spline+MALA(K) row: the spline flow annealed with MALA stages "
                             "(0: skip)")
    parser.add_argument("--samples", type=int, default=None, help="samples of each annealed SNF")
    parser.add_argument("--max-baseline-samples", type=int, default=200_000)
    parser.add_argument("--end-to-end", action="store_true",
                        help="also train the paper's kind of SNF (Metropolis blocks between RealNVP couplings)")
    parser.add_argument("--end-to-end-iterations", type=int, default=1000)
    parser.add_argument("--mc-steps", type=int, default=10, help="Metropolis steps per block of the end-to-end SNF")
    parser.add_argument("--step-size", type=float, default=0.05, help="their proposal width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 300 if args.quick else 3000
    if args.samples is None:
        args.samples = 1000 if args.quick else 10000
    return args


def resolve_sizes(args, temperature: float) -> None:
    """Fill the reference method and sizes left unset by the command line."""
    if args.reference is None:
        args.reference = "md" if temperature > 500 else "umbrella"
    key = (args.reference, args.quick)
    args.reference_size = tuple(args.reference_size or REFERENCE_SIZES[key])
    args.data_size = tuple(args.data_size or DATA_SIZES[key])


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    mol = load_system(args.system)
    resolve_sizes(args, mol.temperature)
    ref = reference(mol, args)
    data, data_method = training_frames(mol, args)
    energy = CountingEnergy(OpenMMEnergy(mol))
    runs = {}
    for flow, label in (("realnvp", "RNVP"), ("spline", "spline")):
        model = train(mol, energy, data, flow, None, args)
        annealed_run = draw(mol, annealed(model["snf"], args.anneal), energy, args.samples, args.seed)
        n_flow = min(annealed_run["sample_evals"], args.max_baseline_samples)
        flow_run = dict(draw(mol, model["snf"], energy, n_flow, args.seed), **model)
        runs[f"{label} flow"] = first_samples(flow_run, args.samples)
        runs[f"{label} flow, same E"] = flow_run
        runs[f"{label}+AIS({args.anneal})"] = dict(annealed_run, **model)
    if args.mala_step:  # the spline flow annealed with Langevin (MALA) stages: forces pulled back through it
        mala = annealed(model["snf"], args.anneal, step_size=args.mala_step, kernel="mala")
        runs[f"spline+MALA({args.anneal})"] = dict(draw(mol, mala, energy, args.samples, args.seed), **model)
    if args.end_to_end:
        model = train(mol, energy, data, "realnvp", "mc", args)
        runs["RNVP+MC SNF"] = dict(draw(mol, model["snf"], energy, args.samples, args.seed), **model)
    rows = {name: evaluate(mol, ref, run) for name, run in runs.items()}
    print_table(mol, ref, data_method, rows, runs, args)
    return rows


if __name__ == "__main__":
    main()

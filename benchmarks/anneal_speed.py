"""Speed of annealed sampling (``sample --anneal K``) of a flow-only model: this checkout against a baseline commit.

Builds alanine dipeptide in implicit solvent (OBC1, 300 K) and the model a run builds by default
(``config.DEFAULTS``: RealNVP, 4 coupling pairs, hidden [128, 128], alternating masks, no stochastic
blocks; ``--flow spline`` for a spline flow) on internal coordinates standardized with short MD, trains it briefly by maximum likelihood
(timing needs realistic acceptance rates, not a good flow), and draws ``--samples`` annealed samples
(``--stages`` K, ``--steps`` Metropolis steps of 0.2 per stage, batches of ``--batch-size``), single-threaded.

The baseline is the package as it was at ``--baseline`` (extracted with ``git archive``), run in a subprocess
on the same model weights and seed (options its builder predates are left out: give ``--masks halves`` for
a baseline from before alternating masks, e.g. e62c566, issue 16's starting point), alternating with this
checkout ``--repeats`` times (the fastest time of each counts; the machine is shared). Both paths also draw
``--check-samples`` samples in float64, which must agree to 1e-10 (samples in nm; log weights relative to
max(1, |log w|), as clashing samples have |log w| of 10^5 and more): the speedups are meant to change no
sample and no weight beyond rounding.
``--profile`` prints where the time goes in the last repeat of each (cProfile, cumulative seconds by part).

The last line is ``anneal_speedup=<baseline seconds / this checkout's seconds>``.

Usage:  OMP_NUM_THREADS=1 python benchmarks/anneal_speed.py [--samples 2000] [--stages 40] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BASELINE = "9815853"  # main before the annealing speedups (issue 16)
#: parts of a sampling pass, by the functions whose cumulative time they are (file suffix, function)
PARTS = {"couplings (all)": ("flows/couplings.py", "_couple"),
         "  conditioner MLPs": ("torch/nn/modules/container.py", "forward"),
         "  splines": ("flows/splines.py", "rq_spline"),
         "IC transform": ("coordinates/transform.py", "forward"),
         "energy (OpenMM bridge)": ("energy/base.py", "_run"),
         "whole sampling": ("flows/snf.py", "sample")}


def build(folder: Path, dtype: torch.dtype):
    """The system, and the default run model with the weights saved in ``folder``, in ``dtype``."""
    from openmm_snf import load_system
    from openmm_snf.coordinates import InternalCoordinateTransform
    from openmm_snf.energy import OpenMMEnergy
    from openmm_snf.flows import build_snf
    setup = json.loads((folder / "setup.json").read_text())
    known = inspect.signature(build_snf).parameters  # a baseline's builder may predate options (e.g. masks)
    model = {key: value for key, value in setup["model"].items() if key in known}
    mol = load_system("alanine_dipeptide_implicit")
    transform = InternalCoordinateTransform.from_system(mol, np.load(folder / "frames.npy"), scheme="mixed")
    snf = build_snf(transform.dim, transform.periodic_mask, OpenMMEnergy(mol), transform, **model)
    snf.load_state_dict(torch.load(folder / "model.pt"))
    return mol, snf.to(dtype).eval()


def draw(snf, n: int, batch_size: int, seed: int) -> dict:
    """n samples (float64 numpy) and their log weights, in batches from one generator, with the wall time."""
    generator = torch.Generator().manual_seed(seed)
    start, xs, log_w = time.perf_counter(), [], []
    for first in range(0, n, batch_size):
        batch = snf.sample(min(batch_size, n - first), generator=generator)
        xs.append(batch.x.double().numpy())
        log_w.append(batch.log_weights.numpy())
    return dict(seconds=time.perf_counter() - start, x=np.concatenate(xs), log_weights=np.concatenate(log_w),
                acceptance=batch.acceptance)


def measure(folder: Path, label: str, profile: bool = False) -> dict:
    """Time this process's package on the saved model (float32), check-draw in float64; save under ``label``."""
    from openmm_snf.flows import annealed
    torch.set_num_threads(1)
    setup = json.loads((folder / "setup.json").read_text())
    a = setup["anneal"]
    _, snf = build(folder, torch.float32)
    sampler = annealed(snf, a["stages"], n_steps=a["steps"], step_size=a["step_size"])
    draw(sampler, min(256, a["batch_size"]), a["batch_size"], 99)  # warm-up: numba kernels, allocator
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    timed = draw(sampler, a["samples"], a["batch_size"], a["seed"])
    if profiler:
        profiler.disable()
        print_profile(profiler, timed["seconds"])
    _, snf64 = build(folder, torch.float64)
    check = draw(annealed(snf64, a["stages"], n_steps=a["steps"], step_size=a["step_size"]), a["check_samples"],
                 a["batch_size"], a["seed"])
    np.savez(folder / f"{label}.npz", seconds=timed["seconds"], log_weights=timed["log_weights"],
             check_x=check["x"], check_log_weights=check["log_weights"])
    return timed


def print_profile(profiler: cProfile.Profile, total: float) -> None:
    stats = pstats.Stats(profiler).stats
    print(f"where the time goes ({total:.2f} s, cProfile cumulative; parts overlap as indented):")
    for part, (suffix, name) in PARTS.items():
        seconds = sum(entry[3] for (path, _, func), entry in stats.items() if path.endswith(suffix) and func == name)
        print(f"  {part:<26} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")


def prepare(folder: Path, args) -> None:
    """MD frames for the IC statistics, the briefly trained default model, and the settings, into ``folder``."""
    from openmm_snf import load_system
    from openmm_snf.md import MDSettings, run_md
    from openmm_snf.config import DEFAULTS
    from openmm_snf.train import TrainConfig, Trainer
    mol = load_system("alanine_dipeptide_implicit")
    frames = run_md(mol, MDSettings(n_frames=250, steps_per_frame=50, n_replicas=8, equilibration_steps=1000,
                                    timestep=1.0, seed=args.seed), progress=False).reshape(-1, mol.n_atoms, 3)
    np.save(folder / "frames.npy", frames)
    model = {key: value for key, value in DEFAULTS["model"].items() if key != "lambdas"}
    model.update(masks=args.masks, flow=args.flow)
    (folder / "setup.json").write_text(json.dumps(dict(model=model, anneal=dict(
        stages=args.stages, steps=args.steps, step_size=args.step_size, samples=args.samples,
        batch_size=args.batch_size, seed=args.seed, check_samples=args.check_samples))))
    torch.manual_seed(args.seed)
    from openmm_snf.coordinates import InternalCoordinateTransform
    from openmm_snf.energy import OpenMMEnergy
    from openmm_snf.flows import build_snf
    transform = InternalCoordinateTransform.from_system(mol, frames, scheme="mixed")
    snf = build_snf(transform.dim, transform.periodic_mask, OpenMMEnergy(mol), transform, **model)
    Trainer(snf, TrainConfig(n_iterations=args.train_iterations, batch_size=256, learning_rate=1e-3, ess_every=0,
                             seed=args.seed), data=torch.as_tensor(frames, dtype=torch.float32), progress=False).train()
    torch.save(snf.state_dict(), folder / "model.pt")


def extract(commit: str, folder: Path) -> Path:
    """The package (and the shipped systems it reads) at ``commit`` under ``folder``, for PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "openmm_snf", "systems"], check=True,
                             capture_output=True).stdout
    target = folder / f"baseline-{commit}"
    with tempfile.TemporaryFile() as tmp:
        tmp.write(archive)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp) as tar:
            tar.extractall(target, filter="data")
    return target


def run_worker(package: Path, folder: Path, label: str, profile: bool) -> None:
    env = dict(os.environ, PYTHONPATH=str(package), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, "--worker", str(folder), label] + (["--profile"] if profile else []),
                   check=True, env=env)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--stages", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-size", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--check-samples", type=int, default=256, help="float64 samples that must agree")
    parser.add_argument("--train-iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="commit whose package is the baseline")
    parser.add_argument("--flow", choices=("realnvp", "spline"), default="realnvp")
    parser.add_argument("--masks", choices=("alternating", "halves"), default="alternating",
                        help="coupling masks; 'halves' for baselines from before e6231d6 (their only masks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="profile the sampling (last repeat)")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measure(Path(args.worker[0]), args.worker[1], profile=args.profile)
        return
    import openmm_snf
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args)
        baseline = extract(args.baseline, folder)
        times = {"baseline": [], "new": []}
        for repeat in range(args.repeats):
            profile = args.profile and repeat == args.repeats - 1
            if profile:
                print("baseline:", flush=True)
            run_worker(baseline, folder, "baseline", profile)
            times["baseline"].append(float(np.load(folder / "baseline.npz")["seconds"]))
            if profile:
                print("this checkout:")
            result = measure(folder, "new", profile=profile)
            times["new"].append(result["seconds"])
        old, new = np.load(folder / "baseline.npz"), np.load(folder / "new.npz")
        dx = np.abs(old["check_x"] - new["check_x"]).max()
        dlw = np.abs(old["check_log_weights"] - new["check_log_weights"])
        dlw_rel = (dlw / np.maximum(1.0, np.abs(old["check_log_weights"]))).max()
    best = {key: min(values) for key, values in times.items()}
    ess = float(np.exp(2 * np.logaddexp.reduce(result["log_weights"]) - np.logaddexp.reduce(2 * result["log_weights"])))
    print(f"alanine_dipeptide_implicit, {args.flow} flow ({args.masks} masks), {args.samples} samples, K = {args.stages} x {args.steps} steps, "
          f"batch {args.batch_size}, 1 thread; torch {torch.__version__}")
    print(f"baseline ({args.baseline}, {baseline}): {' '.join(f'{t:.2f}' for t in times['baseline'])} s")
    print(f"this checkout ({Path(openmm_snf.__file__).parent.parent}): {' '.join(f'{t:.2f}' for t in times['new'])} s "
          f"({1e3 * best['new'] / args.samples:.2f} ms/sample; Kish ESS {ess:.0f}; acceptance mc1 "
          f"{result['acceptance']['mc1']:.2f}, mc{args.stages} {result['acceptance'][f'mc{args.stages}']:.2f})")
    print(f"float64 check, {args.check_samples} samples: max |dx| {dx:.1e} nm, max |d log w| {dlw.max():.1e} "
          f"(relative to max(1, |log w|): {dlw_rel:.1e}; {'agree' if max(dx, dlw_rel) < 1e-10 else 'DIFFER'})")
    print(f"anneal_speedup={best['baseline'] / best['new']:.2f}")


if __name__ == "__main__":
    main()

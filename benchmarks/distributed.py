"""Benchmark of data parallelism: samples per second on 1 vs W ranks (torchrun, gloo on CPU, NCCL on GPUs).

Prepares a run folder (a short MD for the internal-coordinate statistics, an untrained SNF with the
system's shipped model settings, its checkpoint), then for each rank count launches
``torchrun --nproc-per-node W`` on this script in worker mode. Every worker loads the run (its own
OpenMM Context and model), warms up, and times between barriers:

* **sampling**: ``sampling.sample`` of N samples split over the ranks and gathered on rank 0 (what
  ``openmm-snf sample --distributed`` does before writing);
* **training**: reverse-KL iterations of a global batch B (gradient all-reduce included), reported as
  samples per second (B x iterations / s).

Process start-up (imports, Context creation) is not timed. The machine may be shared: compare the
numbers of one run. The last line is ``sampling_speedup_<W>_vs_1_ranks=<ratio>``.

Usage:  python benchmarks/distributed.py [--quick] [--system alanine_dipeptide_vacuum] [--ranks 1 2]
        [--samples 4096] [--batch-size 256] [--iterations 5] [--repeats 3] [--threads T] [--platform CPU]

On a shared 2-core machine torch's OpenMP threads can run several times slower with 2 threads than
with 1 (measured here: 5-15x); ``--threads 1`` compares ranks at equal threads per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def prepare_run(folder: Path, system: str, platform: str | None) -> None:
    """An untrained run of ``system`` (MD frames only fix the coordinate statistics) with its checkpoint."""
    from openmm_snf.config import resolve_config
    from openmm_snf.runs import build_run
    overrides = {"data": {"md": {"n_frames": 50, "steps_per_frame": 50, "n_replicas": 4, "equilibration_steps": 500}},
                 "training": {"n_iterations": 0}}
    if platform:
        overrides["energy"] = {"platform": platform}
    config = resolve_config({"source": system}, None, overrides)
    _, trainer = build_run(folder, config, progress=False)
    trainer.save()


def best_time(call, group, repeats: int) -> float:
    """Best wall seconds of ``call()`` over ``repeats``, each timed on all ranks between barriers
    (rank 0's clock; a shared machine makes single timings noisy)."""
    import torch.distributed as dist
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        start = time.perf_counter()
        call()
        dist.barrier(group)
        times.append(time.perf_counter() - start)
    return min(times)


def worker(args) -> None:
    """One rank: load the run, time sampling and training, rank 0 prints one JSON line."""
    from openmm_snf.distributed import distributed_session
    from openmm_snf.runs import load_run
    from openmm_snf.sampling import sample
    from openmm_snf.train import TrainConfig, Trainer
    with distributed_session() as setup:
        if args.threads:
            torch.set_num_threads(args.threads)
        run = load_run(args.worker, device="cuda" if setup.device.type == "cuda" else "cpu")
        group = setup.group
        sample(run, 2 * setup.world_size, seed=1, batch_size=args.batch_size, progress=False, process_group=group)
        sampling = best_time(lambda: sample(run, args.n, seed=2, batch_size=args.batch_size, progress=False,
                                            process_group=group), group, args.repeats)
        config = TrainConfig(n_iterations=args.iterations * args.repeats + 1, batch_size=args.batch_size,
                             weight_forward=0.0, weight_reverse=1.0, ess_every=0, checkpoint_every=0)
        trainer = Trainer(run.snf, config, progress=False, process_group=group)
        trainer.step()  # warm-up
        training = best_time(lambda: trainer.train(trainer.iteration + args.iterations), group, args.repeats)
        if setup.is_main:
            print(json.dumps({"ranks": setup.world_size, "threads_per_rank": torch.get_num_threads(),
                              "device": str(setup.device), "energy": run.energy.describe(), "sampling_s": sampling,
                              "sampling_per_s": args.n / sampling,
                              "training_samples_per_s": args.batch_size * args.iterations / training}), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(ranks: int, run: Path, args) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    command = [torchrun, "--nproc-per-node", str(ranks), "--master-port", str(_free_port()), __file__,
               "--worker", str(run), "--samples", str(args.n), "--batch-size", str(args.batch_size),
               "--iterations", str(args.iterations), "--repeats", str(args.repeats)] + \
        (["--threads", str(args.threads)] if args.threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="alanine_dipeptide_vacuum")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", dest="n", type=int, default=4096, help="samples drawn in the sampling measurement")
    parser.add_argument("--batch-size", type=int, default=256, help="sampling batch and global training batch")
    parser.add_argument("--iterations", type=int, default=5, help="timed training iterations")
    parser.add_argument("--repeats", type=int, default=3, help="each measurement's best of this many")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: the CPUs divided by the ranks)")
    parser.add_argument("--platform", help="OpenMM platform (default: the fastest available)")
    parser.add_argument("--quick", action="store_true", help="1024 samples, 3 iterations, best of 2")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.n, args.iterations, args.repeats = 1024, 3, 2
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        prepare_run(run, args.system, args.platform)
        results = [launch(ranks, run, args) for ranks in args.ranks]
    print(f"{args.system}, torch {torch.__version__}, {os.cpu_count()} CPUs; {results[0]['energy']}")
    print(f"{'ranks':>5} {'threads/rank':>12} {'sampling /s':>12} {'training samples /s':>20}")
    for r in results:
        print(f"{r['ranks']:>5} {r['threads_per_rank']:>12} {r['sampling_per_s']:>12.0f} "
              f"{r['training_samples_per_s']:>20.0f}")
    base = results[0]
    for r in results[1:]:
        print(f"training_speedup_{r['ranks']}_vs_{base['ranks']}_ranks="
              f"{r['training_samples_per_s'] / base['training_samples_per_s']:.2f}")
    for r in results[1:]:
        ratio = r["sampling_per_s"] / base["sampling_per_s"]
        print(f"sampling_speedup_{r['ranks']}_vs_{base['ranks']}_ranks={ratio:.2f}")


if __name__ == "__main__":
    main()

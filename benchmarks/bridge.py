"""Benchmark of the energy bridge: the sequential single-Context loop vs the batched bridge.

Measures configurations per second, counted from a torch tensor in to torch tensors out, for the
alanine dipeptide systems, separately for forces only and for per-sample energies + forces:

* the sequential loop (``SequentialEnergy``) on every available platform (Reference; CPU with one
  thread and with OpenMM's default threads; CUDA/OpenCL when present); its best is the baseline.
  The loop reads forces straight into a numpy buffer (``read_forces``), as the bridge does: with
  ``State.getForces(asNumpy=True)`` and its unit wrapping the Reference loop is about half as fast;
* the batched bridge (``OpenMMEnergy``) for B in {1, 64, 512, 4096} on every available platform, on
  the CPU with the default route ("compiled": the numba kernel, torch terms for GB forces) and with
  the other routes forced (``forces_from="torch"/"openmm"``).

Timings are the best of several repeats (the machine may be shared; compare ratios within one run).
Implicit solvent (energies + forces): alanine dipeptide (OBC1) and tri-alanine ACE-ALA-ALA-NME
(amber14 + OBC2, ``systems/trialanine_implicit``), the sequential loops against the CPU's torch GB
route and its compiled route (and the GPU platforms' replicated Contexts), B in {64, 512, 4096}
(``--batch-sizes`` if given; 64 and 512 with ``--quick``).

The speed-ups over the best sequential loop for alanine dipeptide in vacuum at B = 512 on the best
available platform: ``forces_speedup_vs_sequential=<ratio>`` and ``speedup_vs_sequential=<ratio>``
(energies + forces); then, the last two lines, alanine dipeptide in implicit solvent at B = 512,
energies + forces: ``implicit_speedup_vs_torch=<ratio>`` (compiled over torch route, CPU) and
``implicit_speedup_vs_sequential=<ratio>`` (the fastest batched variant over the fastest loop). For
these, every loop variant and every batched variant are timed again in alternation (best of many
rounds each), so that all see the same load on a shared machine.

Usage:  python benchmarks/bridge.py [--quick] [--batch-sizes 1 64 512 4096] [--no-implicit]
"""
from __future__ import annotations

import argparse
import os
import platform as host
import time
from functools import partial

import openmm
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy, SequentialEnergy
from openmm_snf.energy.platforms import available_platforms

SYSTEMS = ("alanine_dipeptide_vacuum", "alanine_dipeptide_implicit")
MODES = ("forces", "energies+forces")
IMPLICIT = ("alanine_dipeptide_implicit", "trialanine_implicit")
IMPLICIT_SIZES = (64, 512, 4096)


def configurations(mol, n: int, seed: int = 0) -> torch.Tensor:
    """(n, n_atoms, 3) float64: the reference structure with 0.02 nm Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, mol.n_atoms, 3, generator=generator, dtype=torch.float64)
    return torch.as_tensor(mol.positions)[None] + 0.02 * noise


def best_time(call, min_time: float, min_repeats: int = 3) -> float:
    """Best wall time (s) of ``call()`` over repeats lasting at least ``min_time`` in total."""
    call()  # warm-up: builds Contexts, JIT kernels
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_mode(model, mode):
    return (lambda x: model.forces(x)) if mode == "forces" else (lambda x: model.energy_and_forces(x))


def sequential_variants():
    names = available_platforms()
    variants = [("Reference", {}), ("CPU", {"threads": 1}), ("CPU", {})]
    variants += [(gpu, {"precision": "mixed"}) for gpu in ("CUDA", "OpenCL") if gpu in names]
    return [(name, kwargs) for name, kwargs in variants if name in names]


def batched_variants(quick: bool):
    names = available_platforms()
    variants = [("CPU", {}), ("CPU", {"forces_from": "torch"}), ("CPU", {"forces_from": "openmm"})] + ([("Reference", {})] if not quick else [])
    variants += [(gpu, {"precision": "mixed", "chunk_size": 4096}) for gpu in ("CUDA", "OpenCL") if gpu in names]
    return [(name, kwargs) for name, kwargs in variants if name in names]


def interleaved_times(calls: dict, rounds: int) -> dict:
    """name -> best time (s) of each call, the calls measured in alternation after a warm-up."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def label(name, kwargs):
    extras = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "chunk_size")
    return f"{name}" + (f"({extras})" if extras else "")


def sequential_rates(mol, mode, n_loop, min_time, specs) -> dict:
    """label -> configurations/s of every sequential loop variant on ``n_loop`` configurations."""
    loops = {}
    x_loop = configurations(mol, n_loop)
    for name, kwargs in sequential_variants():
        call = run_mode(SequentialEnergy(mol, platform=name, **kwargs), mode)
        loops[label(name, kwargs)] = n_loop / best_time(lambda: call(x_loop), min_time, 2)
        specs[label(name, kwargs)] = (name, kwargs)
    return loops


def print_loops(system, mode, loops):
    best_loop = max(loops.values())
    for what, rate in loops.items():
        print(f"{system:28s} {mode:16s} {'loop':10s} {what:36s} {'any':>5s} {rate:11.0f} {rate / best_loop:11.2f}")


def print_batched(system, mode, where, size, rate, best_loop):
    print(f"{system:28s} {mode:16s} {'batched':10s} {where:36s} {size:5d} {rate:11.0f} {rate / best_loop:11.2f}")


def implicit_section(quick: bool, sizes, min_time: float, n_loop: int) -> tuple[float, float]:
    """Implicit-solvent rows; returns (compiled over torch, best batched over best loop) for ALDP at B=512."""
    mode, specs = "energies+forces", {}
    routes = [("CPU", {"forces_from": "torch"}), ("CPU", {"forces_from": "compiled"})]
    routes += [(gpu, {"precision": "mixed", "chunk_size": 4096}) for gpu in ("CUDA", "OpenCL")
               if gpu in available_platforms()]
    for system in IMPLICIT:
        mol = load_system(system)
        loops = sequential_rates(mol, mode, n_loop, min_time, specs)
        print_loops(system, mode, loops)
        for name, kwargs in routes:
            model = OpenMMEnergy(mol, platform=name, **kwargs)
            for size in sizes:
                x = configurations(mol, size, seed=1)
                call = run_mode(model, mode)
                rate = size / best_time(lambda: call(x), min_time)
                print_batched(system, mode, f"{label(name, kwargs)} {model.precision}", size, rate, max(loops.values()))
    mol = load_system("alanine_dipeptide_implicit")
    x = configurations(mol, 512, seed=2)
    calls = {"loop " + what: partial(run_mode(SequentialEnergy(mol, platform=name, **kwargs), mode), x)
             for what, (name, kwargs) in specs.items()}
    for name, kwargs in routes:
        calls["batched " + label(name, kwargs)] = partial(run_mode(OpenMMEnergy(mol, platform=name, **kwargs), mode), x)
    times = interleaved_times(calls, 8 if quick else 20)
    best_loop = min((k for k in times if k.startswith("loop")), key=times.get)
    best_batched = min((k for k in times if k.startswith("batched")), key=times.get)
    print(f"# ALDP implicit, B=512, {mode}, alternating timings: "
          + ", ".join(f"{k} {512 / t:.0f}/s" for k, t in times.items())
          + f"; best: {best_batched} over {best_loop}")
    vs_torch = times["batched CPU(forces_from=torch)"] / times["batched CPU(forces_from=compiled)"]
    return vs_torch, times[best_loop] / times[best_batched]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B in {1, 64, 512}, short timings (~1-2 minutes)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--no-implicit", action="store_true", help="skip the implicit-solvent section")
    args = parser.parse_args(argv)
    sizes = args.batch_sizes or ([1, 64, 512] if args.quick else [1, 64, 512, 4096])
    min_time = 0.15 if args.quick else 0.6
    n_loop = 128 if args.quick else 512
    print(f"# host: {host.processor() or host.machine()}, {os.cpu_count()} cores; OpenMM {openmm.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); platforms: {', '.join(available_platforms())}")
    print(f"{'system':28s} {'mode':16s} {'method':10s} {'platform, forces from':36s} {'B':>5s} {'configs/s':>11s} "
          f"{'x best loop':>11s}")
    results, specs = {}, {}
    for system in SYSTEMS:
        mol = load_system(system)
        for mode in MODES:
            loops = sequential_rates(mol, mode, n_loop, min_time, specs)
            best_loop = max(loops.values())
            print_loops(system, mode, loops)
            for name, kwargs in batched_variants(args.quick):
                model = OpenMMEnergy(mol, platform=name, **kwargs)
                specs[label(name, kwargs)] = (name, kwargs)
                call = run_mode(model, mode)
                for size in sizes:
                    x = configurations(mol, size, seed=1)
                    rate = size / best_time(lambda: call(x), min_time)
                    results[(system, mode, label(name, kwargs), size)] = (rate, best_loop, loops)
                    print_batched(system, mode, f"{label(name, kwargs)} {model.precision}", size, rate, best_loop)
    mol = load_system("alanine_dipeptide_vacuum")
    x = configurations(mol, 512, seed=2)
    ratios = {}
    for mode in MODES:
        rows = {what: loops for (system, m, what, size), (_, _, loops) in results.items()
                if system == "alanine_dipeptide_vacuum" and m == mode and size == 512}
        if not rows:
            continue
        calls = {}
        for loop_label in next(iter(rows.values())):  # every loop and every batched variant again, in turn
            loop_name, loop_kwargs = specs[loop_label]
            calls["loop " + loop_label] = partial(run_mode(SequentialEnergy(mol, platform=loop_name, **loop_kwargs),
                                                           mode), x)
        for what in rows:
            name, kwargs = specs[what]
            calls["batched " + what] = partial(run_mode(OpenMMEnergy(mol, platform=name, **kwargs), mode), x)
        times = interleaved_times(calls, 8 if args.quick else 20)
        best_loop = min((k for k in times if k.startswith("loop")), key=times.get)
        best_batched = min((k for k in times if k.startswith("batched")), key=times.get)
        ratios[mode] = times[best_loop] / times[best_batched]
        print(f"# ALDP vacuum, B=512, {mode}, alternating timings: "
              + ", ".join(f"{k} {512 / t:.0f}/s" for k, t in times.items())
              + f"; best: {best_batched} over {best_loop}")
    implicit_sizes = args.batch_sizes or (IMPLICIT_SIZES[:2] if args.quick else IMPLICIT_SIZES)
    implicit = None if args.no_implicit else implicit_section(args.quick, implicit_sizes, min_time, n_loop)
    if "forces" in ratios and "energies+forces" in ratios:
        print(f"forces_speedup_vs_sequential={ratios['forces']:.2f}")
        print(f"speedup_vs_sequential={ratios['energies+forces']:.2f}")
    if implicit is not None:
        print(f"implicit_speedup_vs_torch={implicit[0]:.2f}")
        print(f"implicit_speedup_vs_sequential={implicit[1]:.2f}")


if __name__ == "__main__":
    main()

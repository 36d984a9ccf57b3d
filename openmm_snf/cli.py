"""The ``openmm-snf`` command line: md, umbrella, train, sample, free-energy, report, demo.

Every command is a thin layer over the Python API; ``main(argv)`` is testable without a subprocess.
Errors in the user's input (files, options, configuration) and failures of the environment (a full or
read-only disk, a simulation that blows up, memory) end in one line ``openmm-snf COMMAND: error: ...``
and exit status 2 (``--debug`` shows the traceback instead); every input is checked before work starts.
SIGTERM (``timeout``, batch schedulers) is handled like Ctrl-C: unfinished outputs are not written.
``sample`` and ``free-energy`` with ``--strict`` exit with status 3 when their reliability verdict is UNRELIABLE.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys

from . import __version__

__all__ = ["main", "build_parser"]

EPILOG = "Run 'openmm-snf COMMAND --help' for the options of one command."
UNRELIABLE_EXIT = 3  # exit status of sample / free-energy --strict when the verdict is UNRELIABLE
QUIET_HELP = "no progress bars (they are drawn only on a terminal anyway; TQDM_DISABLE=1 also hides them)"


SIGN_CONVENTION = ("dF = F_A - F_B = -ln(sum_A w / sum_B w) in kT: the first state minus the second, "
                   "positive when the first is the less probable (the demo and README put the rare state first)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends " (default: X)" once, and only where there is a default worth printing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
                or action.default == []):
            return text
        return text + " (default: %(default)s)"


def _forcefield_files(text: str) -> list[str]:
    files = [name.strip() for name in text.split(",") if name.strip()]
    if not files:
        raise argparse.ArgumentTypeError(f"expected force-field XML names, got {text!r}")
    return files


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(kind, low=None, *, above=False, high=None):
    """An argparse type: ``kind`` (int or float), finite, >= ``low`` (> with ``above``), <= ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or low is not None and (value <= low if above else value < low) or \
                high is not None and value > high:
            bound = ([] if kind is int else ["finite"]) + ([] if low is None else [f"{'>' if above else '>='} {low}"])
            bound += [] if high is None else [f"<= {high}"]
            raise argparse.ArgumentTypeError(f"{text!r} must be {' and '.join(bound)}")
        return value
    parse.__name__ = kind.__name__
    return parse


_POSITIVE_INT, _COUNT = _number(int, 1), _number(int, 0)
_POSITIVE, _NON_NEGATIVE = _number(float, 0, above=True), _number(float, 0)
_SEED = _number(int, 0, high=2**31 - 2)  # OpenMM's integrator seeds are 32-bit


def _add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """The one group of system options shared by md, umbrella and train (load_system's arguments)."""
    from .systems import shipped_systems
    group = parser.add_argument_group("system", "what to simulate (the same options for md, umbrella and train)")
    group.add_argument("system", metavar="SYSTEM",
                       help=f"a shipped system ({', '.join(shipped_systems())}), "
                            "a folder with metadata.yaml, a PDB file (with --forcefield/--implicit), a serialized "
                            "System .xml (with --pdb) or an Amber .prmtop (with --pdb FILE.inpcrd)")
    group.add_argument("--pdb", help="structure for a System XML, or coordinates (.inpcrd) for a prmtop")
    group.add_argument("--forcefield", action="extend", type=_forcefield_files, metavar="XML[,XML...]",
                       help="force-field XML names for a PDB SYSTEM, comma-separated or repeated "
                            "(default: amber14-all.xml)")
    group.add_argument("--implicit", choices=["obc1", "obc2", "gbn", "gbn2", "hct"],
                       help="implicit-solvent model for a PDB or prmtop SYSTEM (default: vacuum)")
    group.add_argument("--temperature", type=_POSITIVE,
                       help="temperature in kelvin (default: the system's own, 300 K if it has none)")


def _load(args):
    from .systems import load_system
    return load_system(args.system, pdb=args.pdb, forcefield=args.forcefield, implicit=args.implicit,
                       temperature=args.temperature)


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the processes started by torchrun, e.g. 'torchrun --nproc-per-node "
                             "4 -m openmm_snf.cli COMMAND ... --distributed' (one rank per GPU; rank 0 writes)")
    parser.add_argument("--shards", type=_POSITIVE_INT, metavar="S",
                        help="draw the batch/samples in S shards with their own random streams (default: one per "
                             "rank): equal seeds and S give equal results on any number of ranks dividing S")
    parser.add_argument("--dist-timeout", type=_POSITIVE, default=1800.0, metavar="SECONDS",
                        help="with --distributed: how long a rank waits for the others before failing")
    parser.set_defaults(process_group=None)


def _add_dynamics_arguments(parser: argparse.ArgumentParser, *, frames, steps_per_frame, equilibration,
                            per: str) -> None:
    """Options shared by md and umbrella (Langevin dynamics of many copies); with ``frames`` None every
    default is None: the system's training-data settings decide."""
    own = frames is not None
    parser.add_argument("--frames", type=_POSITIVE_INT, default=frames, help=f"frames saved per {per}")
    parser.add_argument("--steps-per-frame", type=_POSITIVE_INT, default=steps_per_frame,
                        help="integration steps between saved frames")
    parser.add_argument("--equilibration", type=_COUNT, default=equilibration,
                        help="steps before the first saved frame")
    parser.add_argument("--timestep", type=_POSITIVE, default=1.0 if own else None, help="time step in fs")
    parser.add_argument("--friction", type=_POSITIVE, default=1.0 if own else None, help="Langevin friction in 1/ps")
    parser.add_argument("--seed", type=_SEED, default=0 if own else None, help="seed of velocities and Langevin noise")
    parser.add_argument("--platform", help="OpenMM platform (CUDA, OpenCL, CPU, Reference; default: auto, the "
                                           "same choice as train and sample: a GPU if usable, else CPU)")
    parser.add_argument("--threads", type=_POSITIVE_INT, help="CPU platform threads (default: OpenMM's choice)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _md_settings(args, n_replicas: int):
    from .md import MDSettings
    return MDSettings(n_frames=args.frames, steps_per_frame=args.steps_per_frame, n_replicas=n_replicas,
                      timestep=args.timestep, friction=args.friction, equilibration_steps=args.equilibration,
                      seed=args.seed)


def _add_md(sub) -> None:
    p = sub.add_parser("md", formatter_class=_Formatter, help="training data / reference by parallel tempering or MD",
                       description="Langevin dynamics of many copies of the molecule at once. By default parallel "
                                   "tempering: ladders of temperatures from the system's T up to --max-temperature, "
                                   "neighbouring rungs swapping by the replica-exchange rule, so that the data "
                                   "cross barriers that plain MD at T never crosses; every rung's frames are kept "
                                   "and weighted for T by MBAR in OUT.weights.npz. '--max-temperature T' (the "
                                   "system's own) is plain Langevin MD. The defaults are the data 'openmm-snf "
                                   "train SYSTEM' would make (a shipped system's train.yaml, else the package's); "
                                   "'train --data OUT' uses the weights. Writes OUT (DCD), the PDB topology and "
                                   "the weights sidecar beside it; mdtraj.load(OUT, top=OUT.pdb) reads it.")
    _add_system_arguments(p)
    p.add_argument("--out", required=True, help="output .dcd (the .pdb topology and weights are written beside it)")
    p.add_argument("--replicas", type=_POSITIVE_INT,
                   help="independent ladders (with --method md: independent replicas)")
    p.add_argument("--max-temperature", type=_POSITIVE, metavar="K",
                   help="hottest rung in kelvin (default 2.5 x T; T itself: plain MD at T)")
    p.add_argument("--temperatures", type=_POSITIVE_INT, metavar="N",
                   help="rungs per ladder (default: enough for exchange rates of a few tens of percent)")
    p.add_argument("--method", choices=["tempering", "md"],
                   help="tempering (the default, through the batched energy) or md (plain MD at T in one "
                        "replicated OpenMM Context)")
    _add_dynamics_arguments(p, frames=None, steps_per_frame=None, equilibration=None, per="copy")
    p.set_defaults(run=_run_md)


def _md_config(args) -> dict:
    """The run configuration whose ``data`` section the md command makes, with its options applied."""
    from .config import resolve_config
    source = {"source": args.system, "pdb": args.pdb, "forcefield": args.forcefield, "implicit": args.implicit,
              "temperature": args.temperature}
    config = resolve_config(source)
    method = args.method or config["data"]["method"]
    shared = {"n_frames": args.frames, "steps_per_frame": args.steps_per_frame, "timestep": args.timestep,
              "friction": args.friction, "equilibration_steps": args.equilibration, "seed": args.seed}
    if method == "tempering":
        own = {"n_ladders": args.replicas, "max_temperature": args.max_temperature,
               "n_temperatures": args.temperatures}
    else:
        own = {"n_replicas": args.replicas}
        if args.max_temperature is not None or args.temperatures is not None:
            raise ValueError("--max-temperature and --temperatures need --method tempering")
    settings = {key: value for key, value in {**shared, **own}.items() if value is not None}
    energy = {key: value for key, value in (("platform", args.platform), ("threads", args.threads)) if value}
    return resolve_config(source, overrides={"data": {"method": method, method: settings}, "energy": energy})


def _say_platform(command: str, name: str | None):
    """Print (and return) the OpenMM platform ``name`` picks (None: the automatic choice, with its reason)."""
    from .energy.platforms import choose_platform
    choice = choose_platform(name)
    print(f"{command}: OpenMM {choice.name} [{'auto: ' if not name else ''}{choice.reason}]")
    return choice


def _run_md(args) -> int:
    from .io import check_not_inputs, check_outputs_free, trajectory_paths
    from .training_data import make_data
    from .summary import write_summary
    paths = trajectory_paths(args.out)
    config = _md_config(args)
    mol = _load(args)
    check_not_inputs(paths.all, mol.sources)
    check_outputs_free(paths.all + [_summary_path(paths.dcd)], args.force)
    platform = _say_platform("md", config["energy"]["platform"])
    frames, log_weights = make_data(mol, config, paths.dcd, force=args.force, progress=not args.quiet)
    data = config["data"]
    summary = {"command": "md", "version": __version__, "system": mol.name, "out": paths.dcd, "topology": paths.pdb,
               "temperature_kelvin": mol.temperature, "n_frames": len(frames), "method": data["method"],
               "settings": data[data["method"]], "platform": platform.name}
    if data["method"] == "md":
        print(f"wrote {paths.dcd} ({len(frames)} frames of plain MD at {mol.temperature:g} K) and {paths.pdb}")
        settings = data["md"]
        summary.update(replicas=settings["n_replicas"], frames_per_replica=settings["n_frames"],
                       frame_order="replica after replica: frame i belongs to replica i // frames_per_replica",
                       frame_interval_ps=settings["timestep"] * settings["steps_per_frame"] / 1000)
        write_summary(_summary_path(paths.dcd), summary)
        return 0
    from .weights import kish_ess
    print(f"wrote {paths.dcd} ({len(frames)} frames of parallel tempering from {mol.temperature:g} K), {paths.pdb} "
          f"and {paths.npz.name} (MBAR weights for {mol.temperature:g} K, Kish ESS {kish_ess(log_weights):.0f})")
    write_summary(_summary_path(paths.dcd), {**summary, "weights": paths.npz, "kish_ess": kish_ess(log_weights)})
    return 0


def _add_umbrella(sub) -> None:
    p = sub.add_parser("umbrella", formatter_class=_Formatter, help="umbrella-sampling reference along dihedrals",
                       description="Umbrella sampling along one dihedral, or on a grid over two, analysed with MBAR "
                                   "(pymbar). One dihedral: one harmonic window per replica, all replicas in one "
                                   "OpenMM Context. Two (--cv phi psi): WINDOWS x WINDOWS windows, all copies one "
                                   "batch of the compiled energy, neighbouring windows swapping copies along each "
                                   "axis (replica exchange; Langevin dynamics). Along phi alone, alanine windows "
                                   "kept the psi basin they started in for hundreds of ps and the estimates moved "
                                   "by ~1 kT with the run length; hold the residue's phi and psi together for a "
                                   "reference. Writes OUT with a weights sidecar holding the unbiased MBAR log "
                                   "weights of every frame, so 'free-energy' and 'report' treat it like SNF "
                                   "samples; u_kn and N_k for pymbar are stored there too. Warns when neighbouring "
                                   "windows overlap less than 0.03.")
    _add_system_arguments(p)
    p.add_argument("--out", required=True, help="output .dcd (+ .pdb, .weights.npz, .weights.csv)")
    p.add_argument("--cv", nargs="+", default=["phi"], metavar="CV",
                   help="the dihedral(s) to bias, one or two: phi, psi, chi1.. from the topology (psi[ALA2] picks a "
                        "residue, psi[1] the second), a dihedral of the system's metadata, or dihedral:i,j,k,l "
                        "(0-based); two make a grid with replica exchange, e.g. --cv phi[ALA2] psi[ALA2]")
    p.add_argument("--windows", type=_number(int, 2), default=24,
                   help="windows per biased dihedral, centred evenly on [-pi, pi) (a grid has WINDOWS^2)")
    p.add_argument("--k", type=_POSITIVE, default=100.0, help="force constant in kT/rad^2")
    _add_dynamics_arguments(p, frames=500, steps_per_frame=100, equilibration=2000, per="window")
    p.add_argument("--hydrogen-mass", type=_POSITIVE, metavar="AMU",
                   help="mass given to every hydrogen (heavier hydrogens allow a 2-fs --timestep; the "
                        "distribution stays the same; default: the System's masses)")
    p.set_defaults(run=_run_umbrella)


def _run_umbrella(args) -> int:
    import numpy as np
    from .analysis.umbrella import (MIN_NEIGHBOUR_OVERLAP, next_windows, umbrella_dihedral, umbrella_grid,
                                    umbrella_sampling)
    from .io import check_not_inputs, check_outputs_free, trajectory_paths, write_weighted_trajectory
    from .summary import write_summary
    if len(args.cv) > 2:
        raise ValueError(f"--cv takes one or two dihedrals, got {len(args.cv)}: {' '.join(args.cv)}")
    paths = trajectory_paths(args.out)
    mol = _load(args)
    atoms = [umbrella_dihedral(mol, cv)[0] for cv in args.cv]
    summary_path = _summary_path(paths.dcd)
    check_not_inputs(paths.all, mol.sources)
    check_outputs_free(paths.all + [summary_path], args.force)
    _say_platform("umbrella", args.platform)
    if len(args.cv) == 1:
        from dataclasses import replace
        settings = replace(_md_settings(args, args.windows), hydrogen_mass=args.hydrogen_mass)
        umbrella = umbrella_sampling(mol, args.cv[0], settings, force_constant=args.k, platform=args.platform,
                                     threads=args.threads, progress=not args.quiet)
    else:
        from .energy import OpenMMEnergy
        from .reus import ExchangeSettings
        settings = ExchangeSettings(n_frames=args.frames, steps_per_frame=args.steps_per_frame,
                                    timestep=args.timestep, friction=args.friction,
                                    hydrogen_mass=args.hydrogen_mass, equilibration_steps=args.equilibration,
                                    seed=args.seed, metropolize=False)
        umbrella = umbrella_grid(mol, args.cv, args.windows, settings, force_constant=args.k,
                                 energy=OpenMMEnergy(mol, platform=args.platform, threads=args.threads),
                                 progress=not args.quiet)
    analysis = umbrella.analysis
    overlap = umbrella.neighbour_overlaps()
    write_weighted_trajectory(paths.dcd, mol, umbrella.xyz, analysis.log_weights, umbrella.reduced_energies,
                              force=args.force, extra=umbrella.sidecar(mol),
                              frame_time=(args.timestep, args.steps_per_frame))
    inefficiency = np.asarray(analysis.statistical_inefficiency)
    grid = " x ".join(str(n) for n in umbrella.shape)
    swaps = "".join(f"; swaps accepted along {cv}: {rate:.0%}" for cv, rate in zip(args.cv, umbrella.exchange_acceptance))
    for_pymbar = "u_kn, N_k" if len(args.cv) == 1 else "the biased CVs, N_k"
    print(f"wrote {len(umbrella.xyz)} frames ({grid} windows x {args.frames}) with MBAR weights to {paths.dcd} "
          f"(+ {for_pymbar} for pymbar in {paths.npz.name}); statistical inefficiency {inefficiency.min():.1f}-"
          f"{inefficiency.max():.1f} frames; MBAR solved on {int(analysis.kept.sum())} of them; smallest overlap of neighbouring windows {overlap.min():.2g}{swaps}")
    if overlap.min() < MIN_NEIGHBOUR_OVERLAP:
        axis, window = np.unravel_index(int(np.argmin(overlap)), overlap.shape)
        neighbour = int(next_windows(umbrella.shape)[axis, window])
        print(f"warning: MBAR overlap between windows {window} and {neighbour} (along {args.cv[axis]}) is "
              f"{overlap.min():.2g} (< {MIN_NEIGHBOUR_OVERLAP}): the free energies across that gap are unreliable; "
              "use more --windows or a smaller --k", file=sys.stderr)
    result = umbrella.delta_f()
    print(result.summary())
    one = len(args.cv) == 1  # one dihedral: its name, atoms and overlaps unnested
    write_summary(summary_path, {
        "command": "umbrella", "version": __version__, "system": mol.name, "out": paths.dcd,
        "cv": args.cv[0] if one else args.cv, "cv_atoms": atoms[0] if one else atoms,
        "windows": int(umbrella.n_windows), "window_grid": list(umbrella.shape),
        "frames_per_window": args.frames, "exchange_acceptance": list(umbrella.exchange_acceptance),
        "force_constant_kT_per_rad2": args.k, "temperature_kelvin": mol.temperature, "kT_kj_per_mol": mol.kT,
        "statistical_inefficiency": inefficiency, "neighbour_overlap": overlap[0] if one else overlap,
        "min_neighbour_overlap": float(overlap.min()),
        "sign_convention": "delta_f = F_A - F_B (first state minus second), kT",
        "delta_f": {"label_a": result.label_a, "label_b": result.label_b, "delta_f": result.delta_f,
                    "std": result.std, "ci_low": result.ci_low, "ci_high": result.ci_high,
                    "confidence": result.confidence, "kj_per_mol": result.delta_f * mol.kT}})
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", formatter_class=_Formatter, help="train an SNF on a system",
                       description="Train a stochastic normalizing flow. The configuration is the package defaults, "
                                   "then the shipped system's systems/<name>/train.yaml, then --config, then the "
                                   "options below; the resolved configuration is written to OUT/config.yaml. "
                                   "Without --data, training data are made by reference MD (saved as "
                                   "OUT/data.dcd). OUT also receives checkpoint.pt (resumable) and metrics.jsonl.")
    _add_system_arguments(p)
    p.add_argument("--out", required=True, help="run folder (created; must not hold a run unless --resume)")
    p.add_argument("--data", help="training data: a DCD with the PDB topology beside it (e.g. from 'md')")
    p.add_argument("--config", help="YAML file with sections system, energy, data, coordinates, model, "
                                    "training, regularization, device (see openmm_snf/config.py)")
    p.add_argument("--iterations", type=_COUNT, help="total optimizer iterations (default: from the configuration)")
    p.add_argument("--batch-size", type=_POSITIVE_INT, help="samples per loss term (default: from the configuration)")
    p.add_argument("--reverse-kl", type=_NON_NEGATIVE, metavar="WEIGHT",
                   help="weight of the energy-based (reverse KL) loss, which joins the data (forward KL) term "
                        "after training.reverse_start (0.4) of the iterations (default 0: maximum likelihood "
                        "alone; the previous recipe was --reverse-kl 1 --iterations 10000)")
    p.add_argument("--seed", type=_SEED, help="training seed (default: from the configuration, 0)")
    p.add_argument("--platform", help="OpenMM platform for energies (default: auto: a GPU if usable, else the CPU "
                                      "with the compiled kernel; the same choice as md and sample)")
    p.add_argument("--threads", type=_POSITIVE_INT, help="CPU platform threads")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="torch device of the model (default: cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its last checkpoint, with its saved configuration; only "
                        "--iterations, --platform, --threads and --device may change it (others are refused)")
    _add_distributed_arguments(p)
    p.set_defaults(run=_run_train)


def _train_overrides(args) -> dict:
    training = {key: value for key, value in (("n_iterations", args.iterations), ("batch_size", args.batch_size),
                                              ("weight_reverse", args.reverse_kl), ("seed", args.seed),
                                              ("n_shards", args.shards))
                if value is not None}
    overrides = {"training": training} if training else {}
    energy = {key: value for key, value in (("platform", args.platform), ("threads", args.threads)) if value}
    if energy:
        overrides["energy"] = energy
    if args.data:
        overrides["data"] = {"path": args.data}
    if args.device:
        overrides["device"] = args.device
    return overrides


def _run_train(args) -> int:
    from .distributed import run_on_main
    from .config import resolve_config
    from .runs import build_run, discard_unfinished, resume_config
    source = {"source": args.system, "pdb": args.pdb, "forcefield": args.forcefield, "implicit": args.implicit,
              "temperature": args.temperature}
    if args.resume:  # rank 0 reads the saved run (the others read what it records in config.yaml)
        config, changes = run_on_main(lambda: resume_config(args.out, source, args.config, _train_overrides(args)),
                                      args.process_group) or (None, [])
        if changes:
            print(f"--resume applies {', '.join(changes)} (recorded in {args.out}/config.yaml)")
    else:
        config = resolve_config(source, args.config, _train_overrides(args))
    run, trainer = build_run(args.out, config, resume=args.resume, progress=not args.quiet,
                             process_group=args.process_group)
    if trainer.is_main:
        print(f"{run.mol.name}: {run.energy.describe()}")
    try:
        history = trainer.train()
    except BaseException:
        discard_unfinished(run)
        raise
    if trainer.is_main and not history:
        print(f"{run.checkpoint_path} is already at {trainer.iteration} iterations: nothing to train (raise "
              "--iterations to continue)")
    elif trainer.is_main:
        print(f"trained {trainer.iteration} iterations ({trainer.n_skipped} skipped as non-finite); last loss "
              f"{history[-1]['loss']:.3f}; checkpoint {run.checkpoint_path}, metrics {run.metrics_path}")
    if trainer.is_main:
        from .summary import write_summary
        write_summary(run.folder / "summary.json", {
            "command": "train", "version": __version__, "run": run.folder, "system": run.mol.name,
            "temperature_kelvin": run.mol.temperature, "energy": run.energy.describe(),
            "iterations": trainer.iteration, "n_skipped": trainer.n_skipped,
            "last": history[-1] if history else None, "checkpoint": run.checkpoint_path,
            "metrics": run.metrics_path, "data": _training_data_layout(run)})
    return 0


def _training_data_layout(run) -> dict:
    """Where the training frames came from: a file, or data the run made (MD: replica after replica;
    tempering: frames weighted for the target temperature by the sidecar of data.dcd)."""
    data = run.config["data"]
    if data["path"] is not None:
        return {"path": data["path"]}
    method = data.get("method", "md")
    settings = data[method]
    layout = {"path": run.folder / "data.dcd", "method": method, "settings": settings}
    if method == "md":
        layout.update(replicas=settings["n_replicas"], frames_per_replica=settings["n_frames"],
                      frame_order="replica after replica")
    return layout


def _add_sample(sub) -> None:
    from .sampling import ANNEAL_STEP_SIZE, ANNEAL_STEPS, DEFAULT_MAX_N, DEFAULT_PRECISION
    p = sub.add_parser("sample", formatter_class=_Formatter, help="draw weighted samples from a trained run",
                       description="Draw N samples from the SNF in RUN with exact log importance weights "
                                   "log w = u_prior(z) - u(x) + sum of the blocks' log path ratios (raw energies). "
                                   "Writes OUT (DCD), its PDB topology, OUT.weights.npz and OUT.weights.csv "
                                   "(log_weights, normalized weights, reduced energies, frame by frame). "
                                   "Then prints the verdict: Kish ESS overall and per default state (x<0/x>0 for "
                                   "a position CV, phi<0/phi>0 per backbone phi), Pareto k-hat, and "
                                   "'UNRELIABLE: reason; what to do' lines or one 'reliable:' line (and "
                                   "'caution:' lines for states whose weights have infinite variance, k-hat "
                                   "0.5-0.7).")
    p.add_argument("run_dir", metavar="RUN", help="run folder written by 'openmm-snf train'")
    p.add_argument("--n", type=_sample_count, default="auto",
                   help="number of samples, or 'auto' (the default): rounds (30,000 first; 7,500 with 320 "
                        "--anneal stages) until every default state has the Kish ESS for a 95%% interval of "
                        "about ±PRECISION kT on its free energy, (1.96 / PRECISION)^2 (171 for 0.15), with "
                        "k-hat <= 0.7, or until --max-n; it stops early when a state has no samples (the verdict "
                        "then says what to do). An annealed sampler gives a state about its Boltzmann share of "
                        "the samples: phi > 0 of alanine dipeptide at 300 K (0.3%%) needed 160,000-240,000")
    p.add_argument("--precision", type=_POSITIVE, default=DEFAULT_PRECISION, metavar="KT",
                   help="--n auto: the wanted 95%% half-width of each state's free energy, in kT")
    p.add_argument("--max-n", type=_POSITIVE_INT, default=DEFAULT_MAX_N, help="--n auto: the most samples to draw")
    p.add_argument("--out", required=True, help="output .dcd")
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed (same seed, same samples)")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=1024, help="samples drawn per batch")
    p.add_argument("--resample", type=_POSITIVE_INT, metavar="M",
                   help="also write OUT-resampled.dcd: M frames drawn by weight (unweighted)")
    p.add_argument("--anneal", type=_anneal_stages, default="auto", metavar="K",
                   help="refine a flow-only model (model.stochastic: null) by annealed importance sampling: K "
                        "stochastic stages in its prior space from the prior to the pulled-back target; weights "
                        "stay exact, the ESS grows with K (each stage costs --anneal-steps flow passes + "
                        "energies). 'auto': sample the flow alone when a pilot of 4,000 of its samples has "
                        "Kish ESS >= 10%%, Pareto k-hat <= 0.5, and in each default state >= 100 samples "
                        "with k-hat <= 0.5 (fewer: its tail cannot be judged); else K = 40, 80 when the pilot's "
                        "Kish ESS is < 5%%, 320 when < 0.5%%; 0: never")
    p.add_argument("--anneal-kernel", choices=["mc", "mala"], default="mc",
                   help="annealing stages: random-walk Metropolis (energies) or Metropolis-adjusted Langevin (forces)")
    p.add_argument("--anneal-steps", type=_POSITIVE_INT, default=ANNEAL_STEPS, help="steps per annealing stage")
    p.add_argument("--anneal-step-size", type=_POSITIVE, default=ANNEAL_STEP_SIZE,
                   help="Metropolis proposal width in prior units, or the MALA step ε (e.g. 0.02)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="torch device (default: the run's)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_strict_argument(p, "the samples are written all the same")
    _add_distributed_arguments(p)
    p.set_defaults(run=_run_sample)


def _add_strict_argument(parser: argparse.ArgumentParser, note: str) -> None:
    parser.add_argument("--strict", action="store_true",
                        help=f"exit with status {UNRELIABLE_EXIT} when the verdict is UNRELIABLE ({note}); "
                             "without it the UNRELIABLE lines are printed and the exit status is 0")


def _report_verdict(verdict, strict: bool) -> int:
    """Print the verdict (a summary line, then 'UNRELIABLE: reason; what to do' lines or one 'reliable:' line)
    and return the exit status it calls for."""
    print(verdict.summary())
    for line in verdict.lines():
        print(line)
    return UNRELIABLE_EXIT if strict and not verdict.reliable else 0


def _run_sample(args) -> int:
    import numpy as np
    from .io import check_not_inputs, check_outputs_free, read_weighted_trajectory, trajectory_paths, \
        write_resampled_trajectory, write_weighted_trajectory
    from .analysis import default_states, diagnose
    from .distributed import run_on_main
    from .runs import load_run, run_inputs
    from .sampling import draw
    paths = trajectory_paths(args.out)
    resampled = trajectory_paths(paths.dcd.with_name(paths.dcd.stem + "-resampled.dcd"))
    outputs = paths.all + [_summary_path(paths.dcd)] + (resampled.all if args.resample else [])

    def check_outputs():
        check_not_inputs(outputs, run_inputs(args.run_dir))
        check_outputs_free(outputs, args.force)

    run_on_main(check_outputs, args.process_group)
    drawn = draw(load_run(args.run_dir, device=args.device), args.n, anneal=args.anneal, kernel=args.anneal_kernel,
                 n_steps=args.anneal_steps, step_size=args.anneal_step_size, precision=args.precision,
                 max_n=args.max_n, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet,
                 n_shards=args.shards, process_group=args.process_group,
                 report=lambda topic, line: print(f"--{topic} auto: {line}"))
    run, result, args.anneal = drawn.run, drawn.samples, drawn.stages
    if result is None:  # another rank than 0: its samples went to rank 0, which writes them
        return 0
    args.n_auto = None
    if args.n == "auto":
        print(f"--n auto: stopped at {drawn.stopped}")
        args.n_auto = {"precision_kT": args.precision, "max_n": args.max_n, "stopped": drawn.stopped}
    args.n = len(result["log_weights"])
    extra = {"kT": run.mol.kT, "temperature": run.mol.temperature, "cvs_json": json.dumps(run.mol.cvs)}
    write_weighted_trajectory(paths.dcd, run.mol, result["xyz"], result["log_weights"], result["reduced_energies"],
                              force=args.force, extra=extra)
    print(f"wrote {args.n} samples to {paths.dcd} (+ {paths.pdb.name}, {paths.npz.name}, {paths.csv.name}, "
          f"{_summary_path(paths.dcd).name})")
    weighted = read_weighted_trajectory(paths.dcd)
    if args.resample:
        out = write_resampled_trajectory(resampled.dcd, weighted, args.resample,
                                         np.random.default_rng(args.seed), force=args.force)
        print(f"wrote {args.resample} resampled frames to {resampled.dcd} ({out.n_unique} unique)")
    verdict = diagnose(result["log_weights"], default_states(weighted.traj, run.mol.cvs),
                       remedy=_weight_remedy(run.config["model"].get("stochastic") is None, args.anneal))
    _write_sample_summary(args, run, result, paths, verdict)
    return _report_verdict(verdict, args.strict)


def _sample_count(text: str):
    """sample --n: 'auto' or a number of samples >= 1."""
    return text if text == "auto" else _POSITIVE_INT(text)


def _anneal_stages(text: str):
    """--anneal: 'auto' or a number of stages >= 0."""
    if text == "auto":
        return text
    try:
        stages = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of stages, got {text!r}") from None
    if stages < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of stages >= 0, got {stages}")
    return stages


#: advice for uneven weights once annealing has as many stages as --anneal auto gives a poor flow: on a 53-atom
#: peptide (benchmarks/HISTORY.md) neither 160 stages nor longer or wider training brought k-hat below 0.7
WITHOUT_FLOW = ("; or get dF without the flow, from umbrella sampling on each residue's (phi, psi) grid: "
                "'openmm-snf umbrella SYSTEM --cv phi[RES] psi[RES] --out us.dcd', then 'openmm-snf free-energy "
                "us.dcd --states \"A: phi[RES] > 0\" \"B: phi[RES] < 0\"'")


def _weight_remedy(flow_only: bool, anneal: int) -> str:
    """What to do about uneven weights, for this kind of model and sampling."""
    from .sampling import POOR_FLOW_STAGES
    train = "train longer ('openmm-snf train ... --resume --iterations N')"
    if not flow_only:
        return f"{train}; --anneal needs a flow-only model (model.stochastic: null)"
    if not anneal:
        return f"sample with --anneal K (e.g. 40) or {train}"
    return f"raise --anneal (now {anneal}) or {train}" + (WITHOUT_FLOW if anneal >= POOR_FLOW_STAGES else "")


def _write_sample_summary(args, run, result: dict, paths, verdict) -> None:
    """``OUT.summary.json``: what sample printed (the verdict included), and how the samples were made."""
    from .summary import write_summary
    from .weights import kish_ess, normalized_weights
    log_w = result["log_weights"]
    fields = {"command": "sample", "version": __version__, "run": args.run_dir, "out": paths.dcd,
              "weights": paths.npz, "system": run.mol.name, "temperature_kelvin": run.mol.temperature,
              "kT_kj_per_mol": run.mol.kT, "n": int(len(log_w)), "n_auto": args.n_auto, "seed": args.seed,
              "anneal": {"stages": args.anneal, "kernel": args.anneal_kernel, "steps": args.anneal_steps,
                         "step_size": args.anneal_step_size} if args.anneal else None,
              "kish_ess": kish_ess(log_w), "ess_fraction": kish_ess(log_w) / len(log_w),
              "largest_weight": float(normalized_weights(log_w).max()),
              "log_weight_range": float(log_w.max() - log_w.min()), "acceptance": result["acceptance"],
              "verdict": verdict.to_dict()}
    write_summary(_summary_path(paths.dcd), fields)


def _add_free_energy(sub) -> None:
    p = sub.add_parser("free-energy", formatter_class=_Formatter, help="free-energy difference between two states",
                       description=f"{SIGN_CONVENTION}, from a weighted DCD (weights from its .weights.npz "
                                   "sidecar; a DCD without sidecar counts as unweighted MD), with a bootstrap "
                                   "interval, the effective sample size per state and pymbar's EXP estimate as a "
                                   "cross-check, then the verdict on the two states (see 'sample --help'). A state "
                                   "without samples is an error (exit status 2).",
                       epilog='Example: openmm-snf free-energy samples.dcd --states "A: phi > 0" "B: phi < 0"\n'
                              "CVs: phi, psi, omega, chi1..4 (from the topology), names stored by 'sample', or "
                              "your own with --cv NAME=SPEC, SPEC one of dihedral:i,j,k,l angle:i,j,k "
                              "distance:i,j position:i,x rmsd[:selection] (atoms 0-based, angles in radians).")
    p.add_argument("samples", help="weighted (or MD) .dcd; its topology is the .pdb beside it unless --top")
    p.add_argument("--states", nargs=2, required=True, metavar="STATE",
                   help='two states "LABEL: condition", e.g. "A: phi > 0" "B: phi < 0" (dF = F_A - F_B); '
                        "conditions combine comparisons with and/or/not")
    p.add_argument("--cv", action="append", default=[], metavar="NAME=SPEC", help="define a CV (repeatable)")
    p.add_argument("--top", help="topology file (default: the .pdb beside the DCD)")
    p.add_argument("--reference", help="reference structure (PDB) for rmsd CVs")
    p.add_argument("--bootstrap", type=_number(int, 10), default=1000, help="bootstrap replicates")
    p.add_argument("--block-length", type=_block_length, default="auto",
                   help="frames per bootstrap block; auto: the statistical inefficiency of the state indicators "
                        "in frame order (pymbar.timeseries), 1 for independent samples, more for MD frames")
    p.add_argument("--seed", type=_SEED, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true",
                   help="print the result as strict JSON (with its verdict; non-finite values: null, named in "
                        "'error')")
    p.add_argument("--summary", metavar="FILE.json", help="also write the result to this JSON file")
    p.add_argument("--plot", metavar="FILE.png", help="also draw each state's share with its 95%% interval")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    _add_strict_argument(p, "the result is printed all the same")
    p.set_defaults(run=_run_free_energy)


def _block_length(text: str):
    if text == "auto":
        return text
    return _POSITIVE_INT(text)


def _summary_path(dcd):
    """``x.dcd`` -> ``x.summary.json``."""
    from pathlib import Path
    return Path(f"{Path(dcd).with_suffix('')}.summary.json")


def _read_samples(path, top):
    """A weighted trajectory, or an unweighted one (MD) when no sidecar is beside the DCD."""
    from .io import WeightedTrajectory, read_trajectory, read_weighted_trajectory, trajectory_paths
    if trajectory_paths(path).npz.is_file():
        return read_weighted_trajectory(path, top)
    traj = read_trajectory(path, top)
    print(f"note: no weights sidecar beside {path}: treating its frames as unweighted (MD)", file=sys.stderr)
    return WeightedTrajectory.unweighted(traj)


def _run_free_energy(args) -> int:
    from .analysis import EmptyStateError, parse_cv_definition, state_free_energy
    from .analysis.diagnostics import data_advice
    from .io import read_structure
    reference = read_structure(args.reference, "--reference") if args.reference else None
    samples = _read_samples(args.samples, args.top)
    cvs = json.loads(str(samples.extra["cvs_json"])) if "cvs_json" in samples.extra else {}
    cvs.update(dict(parse_cv_definition(text) for text in args.cv))
    kT = float(samples.extra["kT"]) if "kT" in samples.extra else None
    try:
        result = state_free_energy(samples.traj, samples.log_weights, *args.states, cvs=cvs, reference=reference,
                                   kT=kT, n_bootstrap=args.bootstrap, seed=args.seed, block_length=args.block_length,
                                   advice=data_advice(samples.extra))
    except EmptyStateError as err:  # no free energy: show why (UNRELIABLE lines), then the one-line error
        if err.verdict is not None and not args.json:
            _report_verdict(err.verdict, args.strict)
        raise
    fields = {"command": "free-energy", "version": __version__, "samples": args.samples, "states": args.states,
              "sign_convention": "delta_f = F_A - F_B (first state minus second), kT", **result.to_dict()}
    if args.summary:
        from .summary import write_summary
        write_summary(args.summary, fields)
    if args.plot:
        from .analysis.plots import plot_state_free_energies
        plot_state_free_energies(args.plot, result, force=args.force)
    if args.json:  # stdout stays pure JSON; a human still sees an UNRELIABLE verdict on stderr
        from .summary import strict_json
        print(strict_json(fields))
        for line in [] if result.verdict.reliable else result.verdict.lines():
            print(line, file=sys.stderr)
        return UNRELIABLE_EXIT if args.strict and not result.verdict.reliable else 0
    print(result.summary())
    print(f"pymbar EXP: {result.exp_delta_f:.3f} +- {result.exp_std:.3f} kT")
    return _report_verdict(result.verdict, args.strict)


def _add_report(sub) -> None:
    p = sub.add_parser("report", formatter_class=_Formatter, help="plots of a run and its samples",
                       description="PNG plots: training curves (from RUN/metrics.jsonl); with --samples also the "
                                   "histogram of log weights (top 50 nats), reduced energies of the raw and "
                                   "reweighted samples against the reference MD (RUN/data.dcd), dF and ESS against "
                                   "the number of samples, a Ramachandran map and the free-energy profile along "
                                   "phi in degrees (or along the system's first CV) with its bootstrap band, and "
                                   "the MBAR overlap of umbrella samples. Without RUN, only the samples' plots "
                                   "(e.g. 'openmm-snf report --samples us.dcd' after 'umbrella').")
    p.add_argument("run_dir", metavar="RUN", nargs="?", help="run folder written by 'openmm-snf train'")
    p.add_argument("--samples", help="weighted samples (.dcd) written by 'openmm-snf sample' or 'umbrella'")
    p.add_argument("--out-dir", help="folder for the PNG files (default: RUN/plots, or SAMPLES-plots without RUN)")
    p.add_argument("--force", action="store_true", help="overwrite existing plots")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from pathlib import Path
    from .analysis.report import write_report
    from .runs import load_run_system, read_run_config
    if args.run_dir is None and args.samples is None:
        raise ValueError("nothing to plot: give a run folder (RUN), --samples, or both")
    reference, reference_energy = None, None
    if args.run_dir is not None:
        reference = Path(args.run_dir) / "data.dcd"
        if not reference.is_file():  # trained with --data: those frames are the reference
            reference = (read_run_config(args.run_dir).get("data") or {}).get("path")
    if args.samples and reference:  # the reference MD in the energy histogram
        import torch
        from .energy import OpenMMEnergy
        energy = OpenMMEnergy(load_run_system(args.run_dir))
        reference_energy = lambda xyz: energy.energy_and_forces(torch.as_tensor(xyz))[0].numpy()  # noqa: E731
    out_dir = args.out_dir or (None if args.run_dir else Path(args.samples).with_suffix("").as_posix() + "-plots")
    for path in write_report(args.run_dir, args.samples, out_dir=out_dir, force=args.force,
                             reference=reference, reference_energy=reference_energy):
        print(f"wrote {path}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", formatter_class=_Formatter, help="the whole workflow on a shipped system",
                       description="md -> train -> sample -> free-energy -> report on a shipped system, in OUT. "
                                   "Running it again continues the training in OUT/run (up to --iterations) and "
                                   "rewrites the samples and plots.")
    p.add_argument("--system", default="alanine_dipeptide_vacuum", help="shipped system")
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--iterations", type=_COUNT, help="training iterations (default: the system's train.yaml)")
    p.add_argument("--n", type=_POSITIVE_INT, default=10000, help="samples to draw")
    p.add_argument("--anneal", type=_COUNT, default=40, metavar="K",
                   help="annealing stages for a flow-only model (the alanine dipeptide default; 0: plain flow samples)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from pathlib import Path
    from .runs import read_run_config
    from .systems import load_system
    states = load_system(args.system).states
    if not states:
        raise ValueError(f"system {args.system!r} names no states ('states' in its metadata.yaml): the demo's free "
                         "energy needs two; run the commands one by one with free-energy --states")
    out = Path(args.out)
    run_dir, samples = out / "run", out / "samples.dcd"
    train = ["train", args.system, "--out", str(run_dir)] + (["--iterations", str(args.iterations)]
                                                             if args.iterations is not None else [])
    if (run_dir / "config.yaml").is_file():
        train.append("--resume")
    status = _demo_step(train, args.quiet)
    if status:
        return status
    config = read_run_config(run_dir)
    sample = ["sample", str(run_dir), "--n", str(args.n), "--out", str(samples), "--force"]
    if args.anneal and config["model"].get("stochastic") is None:  # a flow: anneal its samples (exact weights)
        sample += ["--anneal", str(args.anneal), "--anneal-steps", "2"]  # 2 steps per stage: the demo's time budget
    steps = [sample, ["free-energy", str(samples), "--states", *states]]
    if config["data"]["method"] == "md":  # plain MD at T is an equilibrium reference (tempering data are reweighted)
        # bootstrap blocks of one replica's frames: consecutive MD frames are correlated
        steps.append(["free-energy", str(run_dir / "data.dcd"), "--states", *states,
                      "--block-length", str(config["data"]["md"]["n_frames"])])
    steps.append(["report", str(run_dir), "--samples", str(samples), "--force"])
    for argv in steps:
        status = _demo_step(argv, args.quiet)
        if status:
            return status
    return 0


def _demo_step(argv: list[str], quiet: bool) -> int:
    print(f"\n$ openmm-snf {shlex.join(argv)}", flush=True)  # quoted, so it can be pasted into a shell
    return main((["--quiet"] if quiet else []) + argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="openmm-snf", formatter_class=_Formatter, epilog=EPILOG,
        description="Stochastic Normalizing Flows for OpenMM: reference MD, training, sampling with exact "
                    "importance weights, free-energy differences and plots.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    parser.add_argument("--torch-threads", type=_POSITIVE_INT, default=1,
                        help="torch threads of the model on the CPU (more threads rarely help small molecules and "
                             "compete with OpenMM's own; with --distributed each rank gets its share instead)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_md, _add_umbrella, _add_train, _add_sample, _add_free_energy, _add_report, _add_demo):
        add(sub)
    for command in sub.choices.values():  # also accepted after the command; SUPPRESS keeps the top level's value
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


#: glibc's mallopt parameters (malloc.h) and the values the CLI sets: torch's ~1 MB intermediate tensors then
#: stay in the heap between uses instead of being mapped and handed back to the OS each time
_MALLOPT = {"MALLOC_MMAP_THRESHOLD_": (-3, 64 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 256 << 20)}


def _keep_freed_memory() -> list[str]:
    """Raise glibc's mmap and trim thresholds for this process (annealed sampling of tri-alanine: 12% faster,
    the system time of its page faults gone); a threshold the environment sets is left to it. Returns the
    names set; none off glibc."""
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return []
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    return [name for name, (parameter, value) in _MALLOPT.items()
            if name not in os.environ and mallopt(parameter, value) == 1]


def _dispatch(args) -> int:
    """Run the command, inside a torch.distributed session (joined from torchrun's environment) with --distributed."""
    _keep_freed_memory()
    if not getattr(args, "distributed", False):
        import torch
        if args.torch_threads < 1:
            raise ValueError(f"--torch-threads must be a positive integer, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)
        return args.run(args)
    from .distributed import distributed_session
    with distributed_session(timeout_s=args.dist_timeout) as setup:
        args.process_group = setup.group
        return args.run(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that unfinished outputs are cleaned up the same way."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _is_user_facing(err: BaseException) -> bool:
    """Whether ``err`` ends a command with one line and exit status 2: the package's own error classes,
    a ValueError the package raised itself (its checks of arguments), and the environment's failures
    (disk, memory, a simulation that blows up). Anything else is a bug and keeps its traceback."""
    import openmm
    import torch
    from .analysis import AnalysisError
    from .io import TrajectoryIOError
    from .config import RunConfigError
    from .systems import SystemLoadError
    from .train import CheckpointError
    if isinstance(err, (SystemLoadError, TrajectoryIOError, AnalysisError, RunConfigError, CheckpointError, OSError,
                        MemoryError, torch.OutOfMemoryError, openmm.OpenMMException, FloatingPointError)):
        return True
    if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):  # torch's CPU allocator
        return True
    return isinstance(err, ValueError) and _raised_in_package(err)


def _raised_in_package(err: BaseException) -> bool:
    from pathlib import Path
    trace = err.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    package = Path(__file__).resolve().parent
    return trace is not None and package in Path(trace.tb_frame.f_code.co_filename).resolve().parents


def _describe(err: BaseException) -> str:
    import openmm
    import torch
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text:
        return f"out of memory ({text[:200]}); use a smaller --batch-size or --n"
    if isinstance(err, (openmm.OpenMMException, FloatingPointError)):
        return (f"the simulation failed ({text}); check the structure for overlapping atoms, use a smaller "
                "--timestep, or check the collective variable")
    if isinstance(err, OSError) and err.filename is not None:
        return f"cannot use {err.filename}: {err.strerror or text}"
    return text


def main(argv=None) -> int:
    """Entry point of ``openmm-snf``; returns the exit status."""
    from .distributed import DistributedError
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    try:
        return _dispatch(args)
    except DistributedError as err:
        if args.debug:
            raise
        print(f"openmm-snf {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"openmm-snf {args.command}: {what}; finished outputs are complete, unfinished ones were not "
              "written", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        if args.debug or not _is_user_facing(err):
            raise
        _close_progress_bars()
        print(f"openmm-snf {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so that the error starts its own line."""
    from tqdm.auto import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())

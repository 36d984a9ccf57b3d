"""A training run: one resolved configuration -> system, energy, coordinates, SNF; its folder; sampling.

A run folder holds

* ``config.yaml``      the resolved configuration (defaults + the system's ``train.yaml`` + the user's file);
* ``reference.npy``    the frames (n, n_atoms, 3) nm that fixed the internal-coordinate statistics;
* ``data.dcd/.pdb``    the training data, when the run made them (parallel tempering or MD), with their
                       ``.weights.npz``/``.csv`` sidecar (log weights for the target temperature);
* ``checkpoint.pt``    model, optimizer and RNG state (resumable), written atomically by the trainer;
* ``best.pt``          the model of the best validation loss, when training validates (``validation_fraction``);
* ``metrics.jsonl``    one JSON object per iteration.

Configuration sections (YAML; every key optional, see :data:`DEFAULTS`): ``system`` (how to load it),
``energy`` (OpenMM platform), ``data`` (a DCD path — its weights sidecar, when there is one, weights
the frames —, ``balance_states`` (default 0.1: each default state of the verdict — a backbone phi sign,
the double well's x sign — gets at least this share of the training weight, so that the flow proposes
rare states often; 0: off), or how to make data: ``method`` tempering (default: parallel tempering up to
2.5 x T, :mod:`openmm_snf.tempering`, so that the data cross barriers without knowing the states) or
md (plain MD at T), with the ``tempering`` / ``md`` settings), ``coordinates``
(``scheme``: mixed, global, or cartesian for systems of fewer than 3 atoms), ``model`` (arguments of
:func:`~openmm_snf.flows.build_snf`), ``training`` (:class:`~openmm_snf.train.TrainConfig`),
``regularization`` (linlogcut of the training energies, or null), ``device`` (cpu, cuda or auto).

Data parallelism (``process_group``, see :mod:`openmm_snf.distributed`): rank 0 alone creates the run
folder, makes MD data and writes checkpoints and samples; every rank builds its own energy (its own
OpenMM Context on its own device) and model from the folder, which must be on a file system all ranks see.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mdtraj
import numpy as np
import torch
import yaml

from .analysis.diagnostics import MAX_KHAT, default_states
from .coordinates import InternalCoordinateTransform
from .distributed import gather_in_order, local_shards, rank_of, run_on_main, shard_seed, split_sizes, world_size_of
from .energy import OpenMMEnergy, linlogcut
from .energy.platforms import make_platform
from .flows import Reshape, build_snf
from .flows.anneal import annealed
from .flows.builder import check_snf_options, saved_snf_options, snf_defaults
from .io import atomic_outputs, check_outputs_free, read_trajectory, read_weighted_trajectory, resample, \
    trajectory_paths, write_trajectory, write_weighted_trajectory
from .md import MDSettings, run_md
from .systems import SHIPPED_DIR, MolecularSystem, load_system
from .tempering import TemperingSettings, run_tempering
from .train import BEST_NAME, Trainer, TrainConfig, check_checkpoint_model, load_checkpoint

__all__ = ["DEFAULTS", "RunConfigError", "resolve_config", "validate_config", "resume_config", "Run", "build_run",
           "choose_annealing", "discard_unfinished", "load_run", "load_run_system", "make_data", "read_run_config",
           "run_inputs", "sample", "with_annealing"]

DEFAULTS = {
    "system": {"source": None, "pdb": None, "forcefield": None, "implicit": None, "temperature": None},
    "device": "cpu",
    "energy": {"platform": None, "precision": "mixed", "threads": None},
    "data": {"path": None, "max_reference_frames": 2000, "method": "tempering", "balance_states": 0.1,
             "seed_rare_states": {"n_copies": 64, "n_frames": 1500},
             "tempering": asdict(TemperingSettings(n_frames=1500, timestep=2.0, hydrogen_mass=3.0)),
             "md": asdict(MDSettings(n_frames=250, steps_per_frame=250, n_replicas=16))},
    "coordinates": {"scheme": "mixed"},
    "model": snf_defaults(),
    # maximum likelihood on the data for 4000 iterations, then ML (weight 0.1) + reverse KL for 3000
    "training": asdict(TrainConfig(n_iterations=7000, batch_size=256, lr_schedule="cosine", checkpoint_every=500,
                                   ess_every=200, weight_forward=0.1, weight_reverse=1.0, reverse_start=0.57)),
    "regularization": {"high": 500.0, "max": 10000.0},
}


SCHEMES = ("mixed", "global", "cartesian")
DATA_METHODS = ("tempering", "md")
DEVICES = ("cpu", "cuda", "auto")
#: options a resumed run may change (applied, said in one line, recorded in config.yaml); others are refused
RESUMABLE = (("training", "n_iterations"), ("energy", "platform"), ("energy", "threads"), ("device",))
RUN_FILES = ("config.yaml", "reference.npy", "data.dcd", "data.pdb", "data.weights.npz", "data.weights.csv",
             "checkpoint.pt", BEST_NAME, "metrics.jsonl")


class RunConfigError(ValueError):
    """A configuration file or run folder is missing, malformed or inconsistent."""


def _merge(base: dict, update: dict, where: str) -> dict:
    """Deep-merge ``update`` into ``base``; keys that ``base`` lacks are errors."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in out:
            raise RunConfigError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(out))}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RunConfigError(f"{what} not found: {path}")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise RunConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise RunConfigError(f"{path}: expected a mapping of sections (system, model, training, ...)")
    return values


def resolve_config(system_source: dict, user_config: Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults, then ``systems/<name>/train.yaml`` of a shipped system, then the user's file, then overrides."""
    config = _merge(DEFAULTS, {"system": system_source}, "system arguments")
    shipped = SHIPPED_DIR / str(system_source.get("source")) / "train.yaml"
    if shipped.is_file():
        config = _merge(config, _read_yaml(shipped, "shipped training defaults"), str(shipped))
    if user_config is not None:
        config = _merge(config, _read_yaml(Path(user_config), "--config file"), str(user_config))
    return _merge(config, overrides or {}, "command-line options")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(condition: bool, where: str, wanted: str, value) -> None:
    if not condition:
        raise RunConfigError(f"{where} must be {wanted}, got {value!r}")


def validate_config(config: dict, mol: MolecularSystem) -> TrainConfig:
    """Check every section of a resolved configuration against ``mol`` before anything is made or written.

    Returns the :class:`TrainConfig` of the ``training`` section; raises :class:`RunConfigError` naming
    the section, the key and what it must be.
    """
    for section, default in DEFAULTS.items():
        if isinstance(default, dict) and section != "regularization":
            _check(isinstance(config.get(section), dict), section, "a mapping of options", config.get(section))
    _check(config["device"] in DEVICES, "device", f"one of {', '.join(DEVICES)}", config["device"])
    _device(config["device"])
    energy = config["energy"]
    _check(energy["threads"] is None or _is_int(energy["threads"]) and energy["threads"] >= 1, "energy.threads",
           "a positive integer or null", energy["threads"])
    _check(energy["platform"] is None or isinstance(energy["platform"], str), "energy.platform",
           "an OpenMM platform name or null", energy["platform"])
    try:
        make_platform(energy["platform"], precision=energy["precision"], threads=energy["threads"])
    except ValueError as err:
        raise RunConfigError(f"energy: {err}") from err
    data = config["data"]
    _check(data["path"] is None or isinstance(data["path"], str), "data.path", "a DCD file name or null", data["path"])
    _check(_is_int(data["max_reference_frames"]) and data["max_reference_frames"] >= 1, "data.max_reference_frames",
           "a positive integer", data["max_reference_frames"])
    _check(data["method"] in DATA_METHODS, "data.method", f"one of {', '.join(DATA_METHODS)}", data["method"])
    _check(isinstance(data["balance_states"], numbers.Real) and 0 <= data["balance_states"] < 0.5,
           "data.balance_states", "a share in [0, 0.5) (0: off)", data["balance_states"])
    seeding = data["seed_rare_states"]
    _check(seeding is None or isinstance(seeding, dict) and set(seeding) == {"n_copies", "n_frames"}
           and all(_is_int(v) and v >= 0 for v in seeding.values()), "data.seed_rare_states",
           "null or {n_copies: N, n_frames: M} with integers >= 0", seeding)
    if data["path"] is None:  # the settings of the method that will make the data
        _check_data_settings(data["method"], data[data["method"]], mol)
    scheme = config["coordinates"]["scheme"]
    _check(scheme in SCHEMES, "coordinates.scheme", f"one of {', '.join(SCHEMES)}", scheme)
    if scheme != "cartesian" and mol.n_atoms >= 3 and mol.constrained_pairs:
        raise RunConfigError(f"{mol.name}: the System constrains {len(mol.constrained_pairs)} distance(s), which "
                             f"the internal coordinates (coordinates.scheme: {scheme}) cannot represent; rebuild the "
                             "System with constraints=None (PDB sources are built that way)")
    try:
        check_snf_options(config["model"], "model")
        train_cfg = TrainConfig.from_dict(config["training"])
    except ValueError as err:
        raise RunConfigError(str(err)) from err
    regularization = config["regularization"]
    if regularization:
        _check(isinstance(regularization, dict) and set(regularization) <= {"high", "max"}, "regularization",
               "null or a mapping with high and max (kT)", regularization)
        values = {**DEFAULTS["regularization"], **regularization}
        _check(all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values.values())
               and values["high"] < values["max"], "regularization", "finite numbers with high < max", regularization)
    return train_cfg


def _check_data_settings(method: str, values, mol: MolecularSystem) -> None:
    where = f"data.{method}"
    _check(isinstance(values, dict), where, "a mapping of settings", values)
    try:
        settings = (MDSettings if method == "md" else TemperingSettings)(**values)
        for name in ("n_frames", "steps_per_frame", "equilibration_steps", "seed"):
            _check(_is_int(getattr(settings, name)), f"{where}.{name}", "an integer", getattr(settings, name))
        for name in ("timestep", "friction"):
            value = getattr(settings, name)
            _check(isinstance(value, numbers.Real) and math.isfinite(value), f"{where}.{name}", "a finite number",
                   value)
        _check(0 <= settings.seed <= 2**31 - 2, f"{where}.seed", "in [0, 2**31 - 2] (OpenMM's seeds are 32-bit)",
               settings.seed)
        settings.validate(mol.n_atoms) if method == "md" else settings.validate()
    except (TypeError, ValueError) as err:
        raise RunConfigError(f"{where}: {err}") from err


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunConfigError("device: cuda was asked for but torch sees no CUDA device (use cpu or auto)")
    return torch.device(name)


@dataclass
class Run:
    """A configured run: the system, its energy, the SNF and (when training) the data and trainer."""

    folder: Path
    config: dict
    mol: MolecularSystem
    energy: OpenMMEnergy
    snf: torch.nn.Module
    created: tuple = ()  # (folder made by this call or None, files it may write): what a failed new run removes

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"


def _load_mol(config: dict) -> MolecularSystem:
    s = config["system"]
    if s["source"] is None:
        raise RunConfigError("system.source is not set (a shipped name or a file)")
    return load_system(s["source"], pdb=s["pdb"], forcefield=s["forcefield"], implicit=s["implicit"],
                       temperature=s["temperature"])


def _transform(mol: MolecularSystem, config: dict, reference: np.ndarray):
    """(latent dim, periodic mask, deterministic block latent -> Cartesian (B, n_atoms, 3))."""
    scheme = config["coordinates"]["scheme"]
    if scheme == "cartesian" or mol.n_atoms < 3:
        block = Reshape((mol.n_atoms, 3))
        return block.dim, None, block
    block = InternalCoordinateTransform.from_system(mol, reference, scheme=scheme)
    return block.dim, block.periodic_mask, block


def _make_data(mol: MolecularSystem, config: dict, folder: Path, progress: bool = True) -> tuple:
    """Training frames (n, n_atoms, 3) nm and their training log weights (n,) or None (equal weights): the
    configured DCD (weighted by its sidecar when it has one), or data made now and saved as data.dcd;
    with ``data.balance_states`` the weights are then balanced (:func:`_balance_states`)."""
    data = config["data"]
    if data["path"] is None:
        folder.mkdir(parents=True, exist_ok=True)
        frames, log_weights = make_data(mol, config, folder / "data.dcd", force=True, progress=progress)
    else:
        if trajectory_paths(data["path"]).npz.is_file():
            weighted = read_weighted_trajectory(data["path"])
            traj, log_weights = weighted.traj, weighted.log_weights
            print(f"training data {data['path']}: weighted by {trajectory_paths(data['path']).npz.name} (Kish "
                  f"ESS {weighted.ess:.0f} of {weighted.n_frames} frames)")
        else:
            traj, log_weights = read_trajectory(data["path"]), None
        if traj.n_atoms != mol.n_atoms:
            raise RunConfigError(f"data {data['path']}: {traj.n_atoms} atoms, but the system has {mol.n_atoms}")
        frames = traj.xyz.astype(np.float64)
    share, seeding = data["balance_states"], data["seed_rare_states"]
    if share:
        log_weights = np.zeros(len(frames)) if log_weights is None else log_weights
        states = _states(mol, frames)
        if seeding and seeding["n_copies"] and seeding["n_frames"]:
            frames, log_weights, states = _seed_rare_states(mol, config, frames, log_weights, states, share,
                                                            progress)
        log_weights = _balance_states(log_weights, states, float(share))
    return frames, log_weights


def _states(mol: MolecularSystem, frames: np.ndarray) -> dict:
    return default_states(mdtraj.Trajectory(frames.astype(np.float32), mol.mdtraj_topology()), mol.cvs)


def _seed_rare_states(mol, config, frames, log_weights, states, share, progress):
    """Frames of plain Langevin MD at T started inside each rare state, replacing that state's frames.

    A state below ``share`` of the weight (phi > 0 of a peptide at 300 K) is seen in tempering data
    mostly through hot frames whose weights for T are tiny: a few frames carry it, and a flow fitted to
    them fits those frames. Copies started from the state's highest-weight frames and run at T give
    thousands of frames with the right local structure; they carry the state's estimated weight, split
    equally over those still in the state (a basin this rare at T is metastable: few leave it).
    Returns (frames, log weights, states) with the new frames appended and the state's old frames at
    weight zero. The importance weights of samples never see these weights.
    """
    from scipy.special import logsumexp
    settings = {**config["data"]["tempering"], **config["data"]["seed_rare_states"], "n_temperatures": 1,
                "equilibration_steps": 0}
    n_copies = settings.pop("n_copies")
    energy = None
    for label in list(states):
        mask = states[label]
        p = _state_share(log_weights, mask)
        if not mask.any() or p >= share:
            continue
        inside = np.flatnonzero(mask)
        seeds = frames[inside[np.argsort(log_weights[inside])[::-1][:n_copies]]]
        energy = energy or OpenMMEnergy(mol, platform=config["energy"]["platform"],
                                        threads=config["energy"]["threads"])
        new = run_tempering(mol, TemperingSettings(**{**settings, "n_ladders": n_copies}), energy=energy,
                            starts=seeds, progress=progress).frames()
        new_states = _states(mol, new)
        kept = new[new_states[label]]
        if len(kept) == 0:
            continue
        print(f"training data: state {label} ({100 * p:.2g}% of the weight) represented by {len(kept)} frames of MD "
              f"at {mol.temperature:g} K started in it")
        new_log_w = np.full(len(kept), logsumexp(log_weights[mask]) - np.log(len(kept)))
        log_weights = np.concatenate([np.where(mask, -np.inf, log_weights), new_log_w])
        frames = np.concatenate([frames, kept])
        states = {name: np.concatenate([m, new_states[name][new_states[label]]]) for name, m in states.items()}
    return frames, log_weights, states


def _state_share(log_weights: np.ndarray, mask: np.ndarray) -> float:
    """The share of the total weight the frames in ``mask`` hold (0 for an empty state)."""
    from scipy.special import logsumexp
    return float(np.exp(logsumexp(log_weights[mask]) - logsumexp(log_weights))) if mask.any() else 0.0


def _balance_states(log_weights: np.ndarray, states: dict, share: float) -> np.ndarray:
    """Training log weights in which every state holding frames has at least ``share`` of the total weight.

    The flow then proposes rare states (e.g. phi > 0 of a peptide at 300 K, 0.3% of the Boltzmann
    weight) often enough that each gets many samples; the importance weights of the samples are
    computed from the flow's own density, so they stay exact and undo the balancing.
    """
    log_w = np.array(log_weights, dtype=np.float64)
    for mask in states.values():
        if not mask.any() or mask.all():
            continue
        p = _state_share(log_w, mask)
        if p < share:
            log_w[mask] += np.log(share * (1 - p) / (p * (1 - share)))
    return log_w


def make_data(mol: MolecularSystem, config: dict, path_dcd, *, force: bool = False, progress: bool = True) -> tuple:
    """Make the data of ``config["data"]`` (method tempering or md) and write them to ``path_dcd``
    (+ PDB, and for tempering the weights sidecar); return (frames (n, n_atoms, 3) nm, log weights or None)."""
    data = config["data"]
    if data["method"] == "md":
        md = MDSettings(**data["md"])
        frames = run_md(mol, md, platform=config["energy"]["platform"],
                        threads=config["energy"]["threads"], progress=progress).reshape(-1, mol.n_atoms, 3)
        write_trajectory(path_dcd, mol, frames, force=force, frame_time=(md.timestep, md.steps_per_frame))
        return frames, None
    if data["method"] != "tempering":
        raise RunConfigError(f"data.method must be 'tempering' or 'md', got {data['method']!r}")
    energy = OpenMMEnergy(mol, platform=config["energy"]["platform"], threads=config["energy"]["threads"])
    result = run_tempering(mol, TemperingSettings(**data["tempering"]), energy=energy, progress=progress)
    frames, log_weights = result.frames(), result.log_weights()
    write_weighted_trajectory(path_dcd, mol, frames, log_weights, result.reduced_energies.reshape(-1),
                              force=force, extra=_tempering_extra(mol, result))
    return frames, log_weights


def _tempering_extra(mol: MolecularSystem, result) -> dict:
    """Sidecar fields of tempering frames: kT, CVs, temperatures, each frame's rung and the exchange rates."""
    return {"kT": mol.kT, "temperature": mol.temperature, "cvs_json": json.dumps(mol.cvs),
            "temperatures": result.temperatures,
            "temperature_index": result.temperature_index, "exchange_acceptance": result.acceptance}


def _reference_frames(data: np.ndarray, log_weights: np.ndarray | None, limit: int) -> np.ndarray:
    """At most ``limit`` frames that represent the data: evenly strided, or drawn by weight."""
    if log_weights is not None:
        index = np.unique(resample(log_weights, min(limit, len(data)), np.random.default_rng(0)))
        return np.ascontiguousarray(data[index])
    stride = max(1, int(np.ceil(len(data) / limit)))
    return np.ascontiguousarray(data[::stride])


def _assemble(folder: Path, config: dict, mol: MolecularSystem, reference: np.ndarray) -> Run:
    energy = OpenMMEnergy(mol, platform=config["energy"]["platform"], precision=config["energy"]["precision"],
                          threads=config["energy"]["threads"])
    dim, periodic, transform = _transform(mol, config, reference)
    device = _device(config["device"])
    with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, not the process's history
        torch.manual_seed(config["training"]["seed"])
        snf = build_snf(dim, periodic, energy, transform, **config["model"]).to(device)
    return Run(Path(folder), config, mol, energy, snf)


def build_run(folder, config: dict | None, *, resume: bool = False, progress: bool = True,
              process_group=None) -> tuple[Run, Trainer]:
    """Create (or, with ``resume``, reopen) a run folder and return the run and its trainer.

    The configuration is validated (:func:`validate_config`) before anything is written. If building
    a new run fails later (MD blows up, the model cannot be built), the files it wrote are removed, so
    the folder can be used again. With ``resume``, ``config`` is None (the saved one) or the saved one
    with allowed changes (:func:`resume_config`), which are recorded in config.yaml.

    With ``process_group``, rank 0 prepares the folder while the others wait (its errors reach them
    as DistributedError), then every rank reads it (MD data as stored in data.dcd, float32, where a
    single process trains on the frames it just made); the trainer trains data-parallel.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunConfigError(f"--out {folder} is a file; a run needs a folder (give a new folder name)")
    new_folder = not resume and not folder.exists()
    new_files = [] if resume else [folder / name for name in RUN_FILES if not (folder / name).exists()]
    try:
        if resume:
            run_on_main(lambda: _check_resumable(folder), process_group)
        prepared = run_on_main(lambda: _prepare(folder, config, resume, progress), process_group)
        if process_group is not None:  # every rank reads the folder, so all train on the same (DCD) data
            prepared = _prepare(folder, None, True, progress)
        config, mol, train_cfg, (data, log_weights), reference = prepared
        run = _assemble(folder, config, mol, reference)
        regularization = config["regularization"]
        regularizer = None if not regularization else (lambda u: linlogcut(u, **regularization))
        trainer = Trainer(run.snf, train_cfg, data=None if data is None else torch.as_tensor(data),
                          data_log_weights=log_weights, energy_regularizer=regularizer,
                          checkpoint_path=run.checkpoint_path, metrics_path=run.metrics_path, resume=resume,
                          progress=progress, process_group=process_group)
    except BaseException:
        if rank_of(process_group) == 0:
            _remove_new((folder if new_folder else None, new_files))
        raise
    if rank_of(process_group) == 0:
        run.created = (folder if new_folder else None, new_files)
    return run, trainer


def discard_unfinished(run: Run) -> None:
    """After a failure: remove what a new run wrote if it has no checkpoint yet, so that its folder can be
    used again (a run with a checkpoint is kept: ``--resume`` continues it)."""
    if run.created and not run.checkpoint_path.exists():
        _remove_new(run.created)


def _remove_new(created: tuple) -> None:
    """Remove the files (and the folder, if it was made and is empty) that a failed new run created."""
    folder, files = created
    for path in files:
        path.unlink(missing_ok=True)
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def resume_config(folder, system_source: dict, user_config: Path | None = None,
                  overrides: dict | None = None) -> tuple[dict, list[str]]:
    """The saved configuration of the run in ``folder`` with what the user gave explicitly applied:
    the set (not None) values of ``system_source``, the ``user_config`` file, then ``overrides`` (as for
    :func:`resolve_config`, without defaults). Returns (configuration, lines describing the changes).

    Options in :data:`RESUMABLE` are applied; any other that differs from the saved value raises
    :class:`RunConfigError` (a resumed run keeps its configuration).
    """
    folder = Path(folder)
    _check_resumable(folder)
    saved = read_run_config(folder)
    given = {key: value for key, value in system_source.items() if value is not None}
    config = _merge(saved, {"system": given}, "system arguments")
    if user_config is not None:
        config = _merge(config, _read_yaml(Path(user_config), "--config file"), str(user_config))
    config = _merge(config, overrides or {}, "command-line options")
    changes, refused = [], []
    for key, old, new in _differences(saved, config):
        if key in RESUMABLE:
            changes.append(f"{'.'.join(key)}: {old!r} -> {new!r}")
        else:
            refused.append(f"{'.'.join(key)} {new!r} (saved: {old!r})")
    if refused:
        raise RunConfigError(f"--resume keeps the saved configuration of {folder}, but {'; '.join(refused)} "
                             "differ; drop these options, or start a new run (another --out)")
    return config, changes


def _differences(old: dict, new: dict, prefix=()):
    for key in new:
        a, b = old.get(key), new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, prefix + (key,))
        elif _normalized(a) != _normalized(b):
            yield prefix + (key,), a, b


def _normalized(value):
    return [_normalized(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_resumable(folder: Path) -> None:
    for name in ("config.yaml", "checkpoint.pt"):
        if not (folder / name).is_file():
            hint = ("start a new run without --resume" if name == "config.yaml" else
                    "training stopped before its first checkpoint: delete the folder (or choose another --out) "
                    "and start again")
            raise RunConfigError(f"--resume: {folder} holds no {name}; {hint}")


def _prepare(folder: Path, config: dict | None, resume: bool, progress: bool = True):
    """Write a new run folder (or read an existing one):
    (config, mol, TrainConfig, (data or None, log weights or None), reference)."""
    config_path, reference_path = folder / "config.yaml", folder / "reference.npy"
    if resume:
        if not config_path.is_file():
            raise RunConfigError(f"--resume: {folder} holds no config.yaml; start a new run without --resume")
        saved = _read_yaml(config_path, "run configuration")
        config = saved if config is None else config
    elif config_path.exists():
        raise RunConfigError(f"{folder} already holds a run (config.yaml); use --resume to continue it, "
                             "or another --out folder")
    mol = _load_mol(config)
    train_cfg = validate_config(config, mol)
    if not resume:  # a folder that cannot be written is found before the data are made
        folder.mkdir(parents=True, exist_ok=True)
        check_outputs_free([config_path, reference_path])
    needs_reference = config["coordinates"]["scheme"] != "cartesian" and mol.n_atoms >= 3
    data = (None, None)
    if resume:
        reference = np.load(reference_path)
        if config != saved:
            with atomic_outputs([config_path], force=True) as (tmp_config,):
                tmp_config.write_text(yaml.safe_dump(config, sort_keys=False))
        if train_cfg.weight_forward > 0:
            data = _make_data(mol, _merge(config, {"data": {"path": config["data"]["path"] or
                                                            str(folder / "data.dcd")}}, "run"), folder, progress)
    elif needs_reference or train_cfg.weight_forward > 0:
        data = _make_data(mol, config, folder, progress)
        reference = _reference_frames(*data, config["data"]["max_reference_frames"])
    else:
        reference = mol.positions[None]
    if not resume:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_outputs([config_path, reference_path], force=False) as (tmp_config, tmp_reference):
            tmp_config.write_text(yaml.safe_dump(config, sort_keys=False))
            with open(tmp_reference, "wb") as handle:
                np.save(handle, reference)
    return config, mol, train_cfg, data, reference


def run_inputs(folder) -> list[Path]:
    """The files of a run folder and its training data: what no command may overwrite while using the run."""
    folder = Path(folder)
    paths = [folder / name for name in RUN_FILES]
    try:
        data = read_run_config(folder)["data"]["path"]
    except (RunConfigError, KeyError, TypeError):
        return paths
    return paths + ([] if data is None else trajectory_paths(data).all)


def read_run_config(folder) -> dict:
    """The resolved configuration a run folder was trained with (its ``config.yaml``)."""
    config = _read_yaml(Path(folder) / "config.yaml", "run configuration")
    if isinstance(config.get("model"), dict):
        config["model"] = saved_snf_options(config["model"])
    return config


def load_run_system(folder) -> MolecularSystem:
    """The MolecularSystem a run folder was trained on (as its ``config.yaml`` says to load it)."""
    return _load_mol(read_run_config(folder))


def load_run(folder, *, device: str | None = None) -> Run:
    """Reopen a trained run for sampling: model weights from ``best.pt`` (the best validation) when the
    run wrote one, else from ``checkpoint.pt`` (the last iteration)."""
    folder = Path(folder)
    for name in ("config.yaml", "reference.npy", "checkpoint.pt"):
        if not (folder / name).is_file():
            raise RunConfigError(f"{folder} is not a finished run: {name} is missing (train it with "
                                 f"'openmm-snf train ... --out {folder}')")
    config = read_run_config(folder)
    if device is not None:
        config["device"] = device
    mol = _load_mol(config)
    run = _assemble(folder, config, mol, np.load(folder / "reference.npy"))
    best = folder / BEST_NAME
    path = best if best.is_file() else run.checkpoint_path
    check_checkpoint_model(load_checkpoint(path, map_location=_device(config["device"])), run.snf, path)
    run.snf.eval()
    return run


def sample(run: Run, n: int, *, seed: int = 0, batch_size: int = 1024, progress: bool = True,
           n_shards: int | None = None, process_group=None) -> dict | None:
    """Draw ``n`` samples in batches; return numpy arrays xyz (n, n_atoms, 3) nm, log_weights, reduced_energies
    (float64) and the mean Metropolis acceptance per block (over batches).

    ``n`` is drawn in ``n_shards`` contiguous shards (None: one per rank; 1 in a single process), shard k
    with its own generator (``distributed.shard_seed(seed, k, n_shards)``) and concatenated in shard
    order, so equal (seed, n, batch_size, n_shards) give equal samples on any number of ranks dividing
    n_shards. With ``process_group`` the shards are spread over the ranks and gathered on rank 0, which
    returns the result; the other ranks return None.
    """
    from tqdm.auto import tqdm
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    n_shards = n_shards or world_size_of(process_group)
    sizes, shards = split_sizes(n, n_shards), local_shards(n_shards, process_group)
    with tqdm(total=sum(sizes[k] for k in shards), desc="sampling", unit="sample",
              disable=None if progress and rank_of(process_group) == 0 else True) as bar:
        mine = {k: _sample_shard(run, sizes[k], shard_seed(seed, k, n_shards), batch_size, bar) for k in shards}
    gathered = gather_in_order(mine, process_group)
    if gathered is None:
        return None
    shard_parts = {k: part for rank_parts in gathered for k, part in rank_parts.items()}
    parts = [batch for k in range(n_shards) for batch in shard_parts[k]]
    xyz, log_w, u, acceptance = zip(*parts)
    return {"xyz": np.concatenate(xyz), "log_weights": np.concatenate(log_w), "reduced_energies": np.concatenate(u),
            "acceptance": {key: float(np.mean([a[key] for a in acceptance])) for key in acceptance[0]}}


#: ``sample --anneal auto``: pilot samples of the flow alone, and the thresholds that let it sample alone
PILOT_SAMPLES = 4000
PILOT_MIN_ESS_FRACTION = 0.1
PILOT_MAX_KHAT = 0.5
PILOT_MIN_STATE_SAMPLES = 100
AUTO_ANNEAL_STAGES = 40


def choose_annealing(run: Run, *, seed: int = 0) -> tuple[int, str]:
    """Annealing stages for ``sample --anneal auto`` and the reason, from a pilot of the flow alone.

    A flow whose own weights are good is sampled alone: Kish ESS >= 10% and Pareto k-hat <= 0.5 on
    4,000 samples, and k-hat <= 0.7 within each default state (phi sign) that holds >= 100 of them. Each
    sample then costs one flow pass and one energy, ~80x less than annealing. Otherwise 40 annealing
    stages: on alanine dipeptide in implicit solvent they raised a flow's ESS from 16% to 60%, and
    brought the rare state's k-hat from 0.8 (the flow's weights there too heavy-tailed to trust) to 0.5.
    Models with stochastic blocks cannot be annealed (0).
    """
    from .weights import kish_ess, pareto_khat
    if run.config["model"].get("stochastic") is not None:
        return 0, "the model has stochastic blocks (no annealing)"
    pilot = sample(run, PILOT_SAMPLES, seed=seed + 7919, progress=False)
    log_w = pilot["log_weights"]
    ess, khat = kish_ess(log_w) / PILOT_SAMPLES, pareto_khat(log_w)
    summary = f"pilot of {PILOT_SAMPLES} flow samples: Kish ESS {100 * ess:.1f}%, k-hat {khat:.2f}"
    heavy = [f"{label} {pareto_khat(log_w[mask]):.2f}" for label, mask in _states(run.mol, pilot["xyz"]).items()
             if mask.sum() >= PILOT_MIN_STATE_SAMPLES and pareto_khat(log_w[mask]) > MAX_KHAT]
    if heavy:
        summary += f", k-hat within {', '.join(heavy)} (> {MAX_KHAT})"
    if ess >= PILOT_MIN_ESS_FRACTION and khat <= PILOT_MAX_KHAT and not heavy:
        return 0, f"{summary}: sampling the flow alone"
    return AUTO_ANNEAL_STAGES, f"{summary}: annealing with {AUTO_ANNEAL_STAGES} stages (--anneal 0 to skip)"


def with_annealing(run: Run, stages: int | str, *, kernel: str = "mc", n_steps: int = 2, step_size: float = 0.2,
                   seed: int = 0) -> tuple[Run, int, str | None]:
    """``run`` with its flow refined by ``stages`` annealing stages (:func:`~openmm_snf.flows.anneal.annealed`;
    weights stay exact), the stages used, and with ``"auto"`` the reason of :func:`choose_annealing`."""
    reason = None
    if stages == "auto":
        stages, reason = choose_annealing(run, seed=seed)
    if stages:
        run = replace(run, snf=annealed(run.snf, stages, n_steps=n_steps, step_size=step_size, kernel=kernel))
    return run, stages, reason


def _sample_shard(run: Run, n: int, seed: int, batch_size: int, bar) -> list[tuple]:
    """Batches (xyz, log_weights, reduced energies, acceptance dict) of ``n`` samples from one generator."""
    generator = torch.Generator(device=run.snf.prior.device).manual_seed(seed)
    batches, drawn = [], 0
    while drawn < n:
        batch = run.snf.sample(min(batch_size, n - drawn), generator=generator)
        batches.append((batch.x.reshape(len(batch.x), run.mol.n_atoms, 3).cpu().double().numpy(),
                        batch.log_weights.cpu().numpy(), batch.target_energy.cpu().numpy(), batch.acceptance))
        drawn += len(batch.x)
        bar.update(len(batch.x))
    return batches

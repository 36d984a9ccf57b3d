"""A run folder: one resolved configuration -> system, energy, coordinates, SNF, and the trainer.

A run folder holds

* ``config.yaml``      the resolved configuration (defaults + the system's ``train.yaml`` + the user's file);
* ``reference.npy``    the frames (n, n_atoms, 3) nm that fixed the internal-coordinate statistics;
* ``data.dcd/.pdb``    the training data, when the run made them (parallel tempering or MD), with their
                       ``.weights.npz``/``.csv`` sidecar (log weights for the target temperature);
* ``checkpoint.pt``    model, optimizer and RNG state (resumable), written atomically by the trainer;
* ``best.pt``          the model of the best validation loss, when training validates (``validation_fraction``);
* ``metrics.jsonl``    one JSON object per iteration.

Data parallelism (``process_group``, see :mod:`openmm_snf.distributed`): rank 0 alone creates the run
folder, makes MD data and writes checkpoints and samples; every rank builds its own energy (its own
OpenMM Context on its own device) and model from the folder, which must be on a file system all ranks see.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import RunConfigError, merge_config, read_yaml, torch_device, validate_config
from .coordinates import InternalCoordinateTransform
from .distributed import rank_of, run_on_main
from .energy import OpenMMEnergy, linlogcut
from .flows import Reshape, build_snf
from .flows.builder import saved_snf_options
from .io import atomic_outputs, check_outputs_free, trajectory_paths
from .systems import MolecularSystem, load_system
from .train import BEST_NAME, Trainer, check_checkpoint_model, load_checkpoint
from .training_data import reference_frames, training_frames

__all__ = ["Run", "build_run", "discard_unfinished", "load_run", "load_run_system", "read_run_config",
           "resume_config", "run_inputs"]

#: options a resumed run may change (applied, said in one line, recorded in config.yaml); others are refused
RESUMABLE = (("training", "n_iterations"), ("energy", "platform"), ("energy", "threads"), ("device",))
RUN_FILES = ("config.yaml", "reference.npy", "data.dcd", "data.pdb", "data.weights.npz", "data.weights.csv",
             "checkpoint.pt", BEST_NAME, "metrics.jsonl")


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
    block = InternalCoordinateTransform.from_system(mol, reference, scheme=scheme,
                                                    rings=config["coordinates"]["ring_frames"])
    return block.dim, block.periodic_mask, block


def _assemble(folder: Path, config: dict, mol: MolecularSystem, reference: np.ndarray) -> Run:
    energy = OpenMMEnergy(mol, platform=config["energy"]["platform"], precision=config["energy"]["precision"],
                          threads=config["energy"]["threads"])
    dim, periodic, transform = _transform(mol, config, reference)
    device = torch_device(config["device"])
    with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, not the process's history
        torch.manual_seed(config["training"]["seed"])
        snf = build_snf(dim, periodic, energy, transform, **config["model"]).to(device)
    return Run(Path(folder), config, mol, energy, snf)


def build_run(folder, config: dict | None, *, resume: bool = False, progress: bool = True,
              process_group=None) -> tuple[Run, Trainer]:
    """Create (or, with ``resume``, reopen) a run folder and return the run and its trainer.

    The configuration is validated (:func:`~openmm_snf.config.validate_config`) before anything is
    written. If building a new run fails later (MD blows up, the model cannot be built), the files it
    wrote are removed, so the folder can be used again. With ``resume``, ``config`` is None (the saved
    one) or the saved one with allowed changes (:func:`resume_config`), which are recorded in config.yaml.

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
    :func:`~openmm_snf.config.resolve_config`, without defaults). Returns (configuration, lines describing
    the changes).

    Options in :data:`RESUMABLE` are applied; any other that differs from the saved value raises
    :class:`~openmm_snf.config.RunConfigError` (a resumed run keeps its configuration).
    """
    folder = Path(folder)
    _check_resumable(folder)
    saved = read_run_config(folder)
    given = {key: value for key, value in system_source.items() if value is not None}
    config = merge_config(saved, {"system": given}, "system arguments")
    if user_config is not None:
        config = merge_config(config, read_yaml(Path(user_config), "--config file"), str(user_config))
    config = merge_config(config, overrides or {}, "command-line options")
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
        saved = read_run_config(folder)
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
            data = training_frames(mol, merge_config(config, {"data": {"path": config["data"]["path"] or
                                                            str(folder / "data.dcd")}}, "run"), folder, progress)
    elif needs_reference or train_cfg.weight_forward > 0:
        data = training_frames(mol, config, folder, progress)
        reference = reference_frames(*data, config["data"]["max_reference_frames"])
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
    config = read_yaml(Path(folder) / "config.yaml", "run configuration")
    if isinstance(config.get("model"), dict):
        config["model"] = saved_snf_options(config["model"])
    if isinstance(config.get("coordinates"), dict):  # runs saved before ring frames placed rings by rows
        config["coordinates"] = {"ring_frames": False, **config["coordinates"]}
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
    check_checkpoint_model(load_checkpoint(path, map_location=torch_device(config["device"])), run.snf, path)
    run.snf.eval()
    return run

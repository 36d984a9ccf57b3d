"""A run's configuration: the defaults, how the user's files and options merge over them, and the checks.

Configuration sections (YAML; every key optional, see :data:`DEFAULTS`): ``system`` (how to load it),
``energy`` (OpenMM platform), ``data`` (a DCD path — its weights sidecar, when there is one, weights
the frames —, ``balance_states`` (default 0.1: each default state of the verdict — a backbone phi sign,
the double well's x sign — gets at least this share of the training weight, so that the flow proposes
rare states often; 0: off), or how to make data: ``method`` tempering (default: parallel tempering up to
2.5 x T, :mod:`openmm_snf.tempering`, so that the data cross barriers without knowing the states) or
md (plain MD at T), with the ``tempering`` / ``md`` settings), ``coordinates``
(``scheme``: mixed, global, or cartesian for systems of fewer than 3 atoms; ``ring_frames``: each small ring
system's atoms as whitened offsets in a local frame instead of z-matrix rows, :mod:`~openmm_snf.coordinates.rings`), ``model`` (arguments of
:func:`~openmm_snf.flows.build_snf`), ``training`` (:class:`~openmm_snf.train.TrainConfig`),
``regularization`` (linlogcut of the training energies, or null), ``device`` (cpu, cuda or auto).

A configuration is resolved (:func:`resolve_config`: defaults, a shipped system's ``train.yaml``, the
user's file, command-line options) and then checked whole (:func:`validate_config`) before anything is
made or written.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from .energy.platforms import make_platform
from .flows.builder import check_snf_options, snf_defaults
from .md import MDSettings
from .systems import SHIPPED_DIR, MolecularSystem
from .tempering import TemperingSettings
from .train import TrainConfig

__all__ = ["DEFAULTS", "RunConfigError", "merge_config", "read_yaml", "resolve_config", "torch_device",
           "validate_config"]

DEFAULTS = {
    "system": {"source": None, "pdb": None, "forcefield": None, "implicit": None, "temperature": None},
    "device": "cpu",
    "energy": {"platform": None, "precision": "mixed", "threads": None},
    "data": {"path": None, "max_reference_frames": 2000, "method": "tempering", "balance_states": 0.1,
             "seed_rare_states": {"n_copies": 64, "n_frames": 1500},
             "tempering": asdict(TemperingSettings(n_frames=1500, timestep=2.0, hydrogen_mass=3.0)),
             "md": asdict(MDSettings(n_frames=250, steps_per_frame=250, n_replicas=16))},
    "coordinates": {"scheme": "mixed", "ring_frames": True},
    "model": snf_defaults(),
    # maximum likelihood on the (state-balanced) data for 4000 iterations, nothing more. Measured (benchmarks/HISTORY.md,
    # session 13, same data): the 6000 iterations of ML + reverse KL that followed until then moved the
    # flow's mass between states (an Ala-Ser-Phe peptide: 27% of its samples in a region of 3.5% Boltzmann weight,
    # its main basin 49% -> 10%; ML alone: 7% and 41%); without them alanine dipeptide's default pipeline took 18
    # min instead of 42 (dF 5.72 against the grids' 5.73) and tri-alanine's 19 instead of 32 (both phi within
    # 0.19 kT of their grids, ESS 33%). --reverse-kl 1 --iterations 10000 restores the old recipe.
    "training": asdict(TrainConfig(n_iterations=4000, batch_size=256, lr_schedule="cosine", checkpoint_every=500,
                                   ess_every=200, weight_forward=1.0, weight_reverse=0.0, reverse_start=0.4)),
    "regularization": {"high": 500.0, "max": 10000.0},
}

SCHEMES = ("mixed", "global", "cartesian")
DATA_METHODS = ("tempering", "md")
DEVICES = ("cpu", "cuda", "auto")


class RunConfigError(ValueError):
    """A configuration file or run folder is missing, malformed or inconsistent."""


def merge_config(base: dict, update: dict, where: str) -> dict:
    """Deep-merge ``update`` into ``base``; keys that ``base`` lacks are errors."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in out:
            raise RunConfigError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(out))}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = merge_config(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def read_yaml(path: Path, what: str) -> dict:
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
    config = merge_config(DEFAULTS, {"system": system_source}, "system arguments")
    shipped = SHIPPED_DIR / str(system_source.get("source")) / "train.yaml"
    if shipped.is_file():
        config = merge_config(config, read_yaml(shipped, "shipped training defaults"), str(shipped))
    if user_config is not None:
        config = merge_config(config, read_yaml(Path(user_config), "--config file"), str(user_config))
    return _absolute_paths(merge_config(config, overrides or {}, "command-line options"))


def _absolute_paths(config: dict) -> dict:
    """``config`` with its file names (system.source and .pdb, data.path) made absolute when they name files
    here, so that the run folder's config.yaml finds them from any directory ('train mypep.pdb --out run',
    then 'sample run' from elsewhere); shipped system names stay names."""
    for section, key in (("system", "source"), ("system", "pdb"), ("data", "path")):
        value = config.get(section, {}).get(key)
        if isinstance(value, str) and not (SHIPPED_DIR / value / "metadata.yaml").is_file() and Path(value).exists():
            config[section][key] = str(Path(value).resolve())
    return config


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
    torch_device(config["device"])
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
    _check(isinstance(config["coordinates"]["ring_frames"], bool), "coordinates.ring_frames", "true or false",
           config["coordinates"]["ring_frames"])
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


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunConfigError("device: cuda was asked for but torch sees no CUDA device (use cpu or auto)")
    return torch.device(name)

"""Checkpoint files and the training state they carry: resume, the best model, early stopping.

A checkpoint is a dict written by ``torch.save`` to a temporary file that is then renamed:
``format`` (:data:`CHECKPOINT_FORMAT`), ``snf_config`` and ``model`` (enough to rebuild the SNF), and
for a training checkpoint the optimizer state, the :class:`TrainingState` fields, the training
configuration and the shard generators' states (``generator_state`` for one shard,
``generator_states`` for several), everything needed to resume bit-for-bit on the same device.
``best.pt`` (:data:`BEST_NAME`) beside it holds the model of the best validation so far.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..flows.builder import build_snf_from_config, saved_snf_options
from ..flows.snf import SNF

__all__ = ["CHECKPOINT_FORMAT", "BEST_NAME", "CheckpointError", "TrainingState", "save_checkpoint",
           "load_checkpoint", "check_checkpoint_model", "load_snf", "save_training_checkpoint",
           "restore_training_checkpoint", "saved_generator_states"]

CHECKPOINT_FORMAT = "openmm-snf-checkpoint-v1"
BEST_NAME = "best.pt"

_DAMAGED = ("restore it from a copy, or delete it (a deleted best.pt falls back to checkpoint.pt; without "
            "checkpoint.pt the run must be trained again)")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or belongs to another model; the message names the file."""


@dataclass
class TrainingState:
    """Where a run stands: iterations done, steps skipped as non-finite, and the validation record
    (best loss so far, its iteration, validations since without improvement)."""

    iteration: int = 0
    n_skipped: int = 0
    best_val_loss: float = math.inf
    best_iteration: int = 0
    n_stale: int = 0

    def record_validation(self, val_loss: float) -> bool:
        """Count a validation; True if it is the best so far (NaN never is)."""
        if not val_loss < self.best_val_loss:
            self.n_stale += 1
            return False
        self.best_val_loss, self.best_iteration, self.n_stale = val_loss, self.iteration, 0
        return True

    def stopped_early(self, patience: int) -> bool:
        """Whether ``patience`` validations in a row brought no improvement (0: never)."""
        return bool(patience) and self.n_stale >= patience


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them. An interrupt raised inside
    ``torch.save`` makes its zip writer fail on the way out ("unexpected pos ..."), and that RuntimeError
    would replace the interrupt; a checkpoint takes a moment to write, so it is finished first."""
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        held = []  # only the main thread may set handlers, and Python runs them only there
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _interrupts_held():
            with os.fdopen(fd, "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, snf: SNF, **extra) -> None:
    """Atomically write the model (config + state) and any ``extra`` entries to ``path``."""
    if snf.config is None:
        raise ValueError("this SNF was not made by build_snf, so a checkpoint could not rebuild it")
    _atomic_torch_save({"format": CHECKPOINT_FORMAT, "snf_config": snf.config, "model": snf.state_dict(),
                        **extra}, Path(path))


def load_checkpoint(path, map_location=None) -> dict:
    """Read a checkpoint dict, checking its format; :class:`CheckpointError` names a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch/pickle raise assorted errors for truncated or foreign files
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is damaged ({reason}); {_DAMAGED}") from err
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an openmm-snf checkpoint (expected format {CHECKPOINT_FORMAT}); "
                              f"{_DAMAGED}")
    return data


def check_checkpoint_model(state: dict, snf: SNF, path) -> None:
    """Load ``state["model"]`` into ``snf`` after checking that the checkpoint was made for the same model
    (its ``snf_config``); raises :class:`CheckpointError` naming ``path`` otherwise."""
    saved = state.get("snf_config")
    saved = saved_snf_options(saved) if isinstance(saved, dict) else saved
    if snf.config is not None and _plain(saved) != _plain(snf.config):
        raise CheckpointError(f"checkpoint {path} belongs to another model than this run's configuration (copied "
                              f"from another run?); {_DAMAGED}")
    try:
        snf.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model ({str(err).splitlines()[0]}); "
                              f"{_DAMAGED}") from err


def _plain(value):
    """Configs compared as plain data (tuples and lists alike, as after a YAML round trip)."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def load_snf(path, target_energy, transform=None, map_location=None) -> SNF:
    """Rebuild an SNF from a checkpoint; pass the same target energy and transform as in training."""
    data = load_checkpoint(path, map_location)
    snf = build_snf_from_config(data["snf_config"], target_energy, transform)
    check_checkpoint_model(data, snf, path)
    return snf.eval()


def save_training_checkpoint(path, snf: SNF, optimizer, training: TrainingState, train_config: dict,
                             generator_states: list) -> None:
    """Write a resumable checkpoint: model, optimizer, training state, configuration and one generator
    state per shard, in shard order."""
    streams = ({"generator_state": generator_states[0]} if len(generator_states) == 1 else
               {"generator_states": list(generator_states)})
    save_checkpoint(path, snf, optimizer=optimizer.state_dict(), iteration=training.iteration,
                    n_skipped=training.n_skipped, train_config=train_config, best_val_loss=training.best_val_loss,
                    best_iteration=training.best_iteration, n_stale=training.n_stale, **streams)


def saved_generator_states(state: dict) -> list:
    """The shard generators' states of a training checkpoint, in shard order."""
    return state["generator_states"] if "generator_states" in state else [state["generator_state"]]


def restore_training_checkpoint(state: dict, path, snf: SNF, optimizer,
                                n_shards: int) -> tuple[TrainingState, list]:
    """Load a training checkpoint's model and optimizer state into ``snf`` and ``optimizer``; return its
    :class:`TrainingState` and generator states. CheckpointError (naming ``path``) if they do not fit,
    ValueError if it was written with another number of shards."""
    generator_states = saved_generator_states(state)
    if len(generator_states) != n_shards:
        raise ValueError(f"checkpoint {path} holds {len(generator_states)} shard stream(s) but "
                         f"training.n_shards is {n_shards}; set it to {len(generator_states)} to resume")
    check_checkpoint_model(state, snf, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({err}); {_DAMAGED}") from err
    training = TrainingState(iteration=int(state["iteration"]), n_skipped=int(state["n_skipped"]),
                        best_val_loss=float(state.get("best_val_loss", math.inf)),
                        best_iteration=int(state.get("best_iteration", 0)), n_stale=int(state.get("n_stale", 0)))
    return training, generator_states

"""Training an SNF: forward KL (maximum likelihood on data), reverse KL (energy-based) and mixes.

The loss per iteration is
    L = weight_forward · (−mean log q(x_data)) + weight_reverse · (−mean log w_reg)
where log w_reg uses ``energy_regularizer(u_X)`` (e.g. a log cut of high energies) instead of the
raw target energy; reported ESS and acceptance rates always use raw energies.

Reliability: a step whose loss or gradient norm is not finite is skipped (never applied) and
counted; checkpoints are written to a temporary file and renamed, and hold everything needed to
resume bit-for-bit on the same device (model, optimizer, iteration, RNG state, skip count).
Metrics go to a JSON-lines file, one object per iteration.

Validation (``validation_fraction`` > 0): the last fraction of the data frames (a contiguous block, so
that frames correlated in time with it mostly stay out of training too) is held out and never trained
on. Every ``validate_every`` iterations the forward-KL loss on it (mean −log q in eval mode under
``torch.no_grad()``, with a generator reseeded from ``seed`` so validations are comparable) is logged as
``val_loss``; with ``keep_best`` the best model so far is written to ``best.pt`` beside the checkpoint,
and ``patience`` validations without improvement stop training. Validation runs in single-process
training only (a process group with validation_fraction > 0 is an error).

Data parallelism (see :mod:`openmm_snf.distributed`): the global batch is cut into ``n_shards``
shards, each drawn with its own generator stream; with a process group the shards are spread over the
ranks, gradients and metrics are summed in one all-reduce, and only rank 0 writes checkpoints and
metrics. A run is defined by (seed, batch_size, n_shards): training on W ranks equals single-process
training with ``n_shards = W`` up to floating-point reduction order. Buffers that a training pass
changes (adaptive Metropolis step sizes) restart from the iteration's values in every shard and
become the shards' mean weighted by their share of the batch.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import (DistributedError, broadcast_module, check_same_on_all_ranks, gather_in_order,
                          local_shards, rank_of, shard_seed, split_sizes, sum_gradients, world_size_of)
from .flows.builder import build_snf_from_config
from .flows.snf import SNF
from .weights import kish_ess

__all__ = ["TrainConfig", "Trainer", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_checkpoint_model",
           "load_snf", "learning_rate_at", "split_validation", "BEST_NAME"]

CHECKPOINT_FORMAT = "openmm-snf-checkpoint-v1"
LR_SCHEDULES = ("constant", "cosine", "exponential")
BEST_NAME = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or belongs to another model; the message names the file."""


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer` (the paper's ALDP: batch 128, 1000 iterations, Adam 1e-3).

    Attributes:
        n_iterations: optimizer steps in total (resumed runs continue up to this number).
        batch_size: samples per loss term.
        learning_rate: Adam's initial rate; lr_schedule: "constant", "cosine" or "exponential",
            decaying to learning_rate · lr_final_factor at the last iteration.
        weight_forward, weight_reverse: weights of the forward-KL and reverse-KL terms.
        clip_grad_norm: gradient norm clipping (None: off).
        weight_decay: Adam weight decay.
        checkpoint_every: iterations between checkpoints (0: only at the end).
        ess_every: when weight_reverse is 0, draw a monitoring batch every this many iterations for
            ESS and acceptance (0: never); it costs batch_size extra samples.
        seed: seeds the trainer's generator (minibatches and all noise).
        n_shards: the batch is drawn in this many shards (sizes differ by at most one), shard k with
            its own generator (``distributed.shard_seed(seed, k, n_shards)``; one shard: ``seed``) and
            its loss weighted by its share of the batch. None: the checkpoint's count when resuming,
            else the number of ranks (1 in a single process). Runs with equal (seed, batch_size,
            n_shards) agree on any number of ranks that divides n_shards.
        validation_fraction: fraction of the data frames held out for validation, the last ones (0: no
            validation). Single-process training only.
        validate_every: iterations between validations (val_loss in the metrics of those iterations).
        keep_best: write the model of the best validation so far to ``best.pt`` beside the checkpoint.
        patience: validations without improvement after which training stops (0: never early).
    """

    n_iterations: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    lr_final_factor: float = 0.1
    weight_forward: float = 1.0
    weight_reverse: float = 0.0
    clip_grad_norm: float | None = 100.0
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    ess_every: int = 10
    seed: int = 0
    n_shards: int | None = None
    validation_fraction: float = 0.0
    validate_every: int = 50
    keep_best: bool = True
    patience: int = 0

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            kinds = _FIELD_KINDS.get(item.type)
            if kinds and not (value is None and "None" in item.type or any(check(value) for check in kinds)):
                raise ValueError(f"training.{item.name} must be {_KIND_NAMES[item.type]}, got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"training.seed must be in [0, 2**63), got {self.seed}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.n_iterations < 0 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("need n_iterations >= 0, batch_size >= 1 and learning_rate > 0")
        if self.weight_forward < 0 or self.weight_reverse < 0 or self.weight_forward + self.weight_reverse == 0:
            raise ValueError("weight_forward and weight_reverse must be >= 0 and not both 0")
        if self.n_shards is not None and not 1 <= self.n_shards <= self.batch_size:
            raise ValueError(f"n_shards must be between 1 and batch_size ({self.batch_size}), got {self.n_shards}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validate_every < 1 or self.patience < 0:
            raise ValueError("need validate_every >= 1 and patience >= 0")
        if self.checkpoint_every < 0 or self.ess_every < 0 or self.weight_decay < 0:
            raise ValueError("need checkpoint_every >= 0, ess_every >= 0 and weight_decay >= 0")
        if not self.lr_final_factor > 0 or self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError("need lr_final_factor > 0 and clip_grad_norm > 0 (or null)")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ValueError(f"training: expected a mapping of options, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# the annotation of every TrainConfig field -> checks of its values (a typed YAML value or argument)
_FIELD_KINDS = {"int": (_is_int,), "int | None": (_is_int,), "float": (_is_finite,), "float | None": (_is_finite,),
                "str": (lambda v: isinstance(v, str),), "bool": (lambda v: isinstance(v, bool),)}
_KIND_NAMES = {"int": "an integer", "int | None": "an integer or null", "float": "a finite number",
               "float | None": "a finite number or null", "str": "a string", "bool": "true or false"}


def learning_rate_at(config: TrainConfig, iteration: int) -> float:
    """Learning rate of ``iteration`` (0-based) under the configured schedule."""
    progress = min(iteration / max(config.n_iterations - 1, 1), 1.0)
    final = config.lr_final_factor
    if config.lr_schedule == "cosine":
        factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    elif config.lr_schedule == "exponential":
        factor = final ** progress
    else:
        factor = 1.0
    return config.learning_rate * factor


def split_validation(data: torch.Tensor | None, fraction: float):
    """(training frames, held-out frames or None): the last ``round(fraction · N)`` frames are held out."""
    if data is None or fraction == 0:
        return data, None
    n_held_out = round(fraction * len(data))
    if not 1 <= n_held_out < len(data):
        raise ValueError(f"validation_fraction {fraction} of {len(data)} data frames leaves no validation or "
                         "no training frames")
    return data[:-n_held_out], data[-n_held_out:]


def _frame_probabilities(log_weights, n_frames: int, device) -> torch.Tensor:
    """Normalized float64 frame probabilities (n_frames,) from log weights; ValueError if unusable."""
    lw = torch.as_tensor(np.asarray(log_weights, dtype=np.float64)).to(device)
    if lw.shape != (n_frames,):
        raise ValueError(f"data_log_weights must have one entry per data frame ({n_frames}), got shape "
                         f"{tuple(lw.shape)}")
    if torch.isnan(lw).any() or torch.isposinf(lw).any() or not torch.isfinite(lw).any():
        raise ValueError("data_log_weights must be finite (or -inf for frames of zero weight)")
    return torch.softmax(lw, dim=0)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


_DAMAGED = ("restore it from a copy, or delete it (a deleted best.pt falls back to checkpoint.pt; without "
            "checkpoint.pt the run must be trained again)")


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
    if snf.config is not None and _plain(state.get("snf_config")) != _plain(snf.config):
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


class Trainer:
    """Adam training of an SNF with mixed forward/reverse KL, checkpoints and a metrics log.

    Args:
        snf: the model (from :func:`~openmm_snf.flows.build_snf` if checkpoints are wanted).
        config: :class:`TrainConfig`.
        data: data-space samples (N, ...) for the forward-KL term and validation (required if
            weight_forward > 0 or validation_fraction > 0), e.g. (N, n_atoms, 3) nm from MD; moved to
            the model's device and dtype. The last validation_fraction of them are held out
            (:attr:`val_data`) and never trained on (:attr:`data` holds the rest).
        data_log_weights: optional (N,) log importance weights of the frames for the target (e.g. MBAR
            weights of tempered or umbrella data): minibatches are then drawn with probability
            proportional to the weights, so the forward-KL term estimates E_target[-log q]; held-out
            frames are resampled once by weight (seeded) so that the validation loss estimates the same.
        energy_regularizer: maps raw reduced energies (B,) to those used in the reverse-KL loss.
        checkpoint_path: where to write checkpoints; if it exists and ``resume`` is True, training
            continues from it. With validation and keep_best, the best model is written to
            ``best.pt`` in the same folder (no file without a checkpoint path).
        metrics_path: JSON-lines file, one object per iteration (appended to when resuming).
        progress: show a tqdm bar (loss, acceptance, ESS, skipped steps).
        process_group: a torch.distributed process group for data-parallel training (None: this
            process alone). Every rank builds the same model, data and arguments; rank 0's parameters
            are broadcast; only rank 0 writes the checkpoint and metrics, and :meth:`save` is collective.
            Validation is not supported with a process group (ValueError).
    """

    def __init__(self, snf: SNF, config: TrainConfig, *, data: torch.Tensor | None = None,
                 data_log_weights=None, energy_regularizer=None, checkpoint_path=None, metrics_path=None,
                 resume: bool = True, progress: bool = True, process_group=None):
        self.snf = snf
        self.config = config
        self.device, dtype = snf.prior.device, snf.prior.dtype
        if config.validation_fraction > 0 and process_group is not None:
            raise ValueError("validation (validation_fraction > 0) runs in single-process training only; "
                             "set validation_fraction to 0 for data-parallel training")
        if config.weight_forward > 0 or config.validation_fraction > 0:
            if data is None or len(data) < 1:
                raise ValueError("weight_forward > 0 or validation_fraction > 0 needs data (N, ...)")
            data = torch.as_tensor(data).to(self.device, dtype)
            if not torch.isfinite(data).all():
                raise ValueError("training data contain NaN or infinite values")
        self.data, self.val_data = split_validation(data, config.validation_fraction)
        self.data_probs = None
        if data_log_weights is not None and self.data is not None:
            probs = _frame_probabilities(data_log_weights, len(data), self.device)
            self.data_probs = probs[:len(self.data)] / probs[:len(self.data)].sum()
            if self.val_data is not None:
                generator = torch.Generator(device=self.device).manual_seed(config.seed)
                held_out = probs[len(self.data):]
                self.val_data = self.val_data[torch.multinomial(held_out / held_out.sum(), len(self.val_data),
                                                                replacement=True, generator=generator)]
        self.energy_regularizer = energy_regularizer
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.best_path = None if self.checkpoint_path is None else self.checkpoint_path.with_name(BEST_NAME)
        self.metrics_path = None if metrics_path is None else Path(metrics_path)
        self.progress = progress
        self.optimizer = torch.optim.Adam(snf.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
        self.group = process_group
        self.is_main = rank_of(process_group) == 0
        self.iteration = 0
        self.n_skipped = 0
        self.best_val_loss, self.best_iteration, self.n_stale = math.inf, 0, 0
        state = None
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path, map_location=self.device)
        saved = None
        if state is not None:
            saved = state["generator_states"] if "generator_states" in state else [state["generator_state"]]
        self._make_shards(config.n_shards or (len(saved) if saved else world_size_of(process_group)))
        if state is not None:
            self._restore(state, saved)
        if resume and self.is_main and self.metrics_path is not None:
            _trim_metrics(self.metrics_path, self.iteration)
        broadcast_module(snf, process_group)
        check_same_on_all_ranks((self.iteration, self.n_shards, config.batch_size, config.seed), process_group,
                                "(iteration, n_shards, batch_size, seed)")

    def _make_shards(self, n_shards: int) -> None:
        """Shard sizes of the batch and a generator for each shard of this rank."""
        self.n_shards = n_shards
        self.shard_sizes = split_sizes(self.config.batch_size, n_shards)
        self.generators = {k: torch.Generator(device=self.device).manual_seed(shard_seed(self.config.seed, k, n_shards))
                           for k in local_shards(n_shards, self.group)}

    def _restore(self, state: dict, generator_states: list) -> None:
        if len(generator_states) != self.n_shards:
            raise ValueError(f"checkpoint {self.checkpoint_path} holds {len(generator_states)} shard stream(s) but "
                             f"training.n_shards is {self.n_shards}; set it to {len(generator_states)} to resume")
        check_checkpoint_model(state, self.snf, self.checkpoint_path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {self.checkpoint_path}: optimizer state does not fit ({err}); "
                                  f"{_DAMAGED}") from err
        for k, generator in self.generators.items():
            generator.set_state(generator_states[k].to("cpu"))
        self.iteration = int(state["iteration"])
        self.n_skipped = int(state["n_skipped"])
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.best_iteration = int(state.get("best_iteration", 0))
        self.n_stale = int(state.get("n_stale", 0))

    def save(self, path=None) -> Path | None:
        """Write a resumable checkpoint (atomically) and return its path.

        Distributed: every rank must call it (the shard generators are gathered); rank 0 writes and
        the others return None. A rank that has failed makes the gather, and so the write, fail.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path given")
        parts = gather_in_order({k: g.get_state() for k, g in self.generators.items()}, self.group)
        if not self.is_main:
            return None
        states = {k: state for part in parts for k, state in part.items()}
        streams = ({"generator_state": states[0]} if self.n_shards == 1 else
                   {"generator_states": [states[k] for k in range(self.n_shards)]})
        save_checkpoint(path, self.snf, optimizer=self.optimizer.state_dict(), iteration=self.iteration,
                        n_skipped=self.n_skipped, train_config=asdict(self.config), best_val_loss=self.best_val_loss,
                        best_iteration=self.best_iteration, n_stale=self.n_stale, **streams)
        return path

    def validate(self) -> float:
        """Mean −log q(x) over the held-out frames, float; eval mode (no step-size adaptation), no
        gradients, in chunks of batch_size, with a generator seeded from ``seed`` for every call (for
        stochastic blocks the single-path estimate), so successive validations are comparable."""
        if self.val_data is None:
            raise ValueError("no validation frames: set validation_fraction > 0")
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        was_training = self.snf.training
        self.snf.eval()
        try:
            with torch.no_grad():
                for chunk in self.val_data.split(self.config.batch_size):
                    total += self.snf.forward_kl_loss(chunk, generator=generator) * len(chunk)
        finally:
            self.snf.train(was_training)
        return float(total) / len(self.val_data)

    def _record_validation(self, val_loss: float) -> None:
        """Track the best validation (writing ``best.pt`` with keep_best) and the validations since."""
        if not val_loss < self.best_val_loss:  # NaN never improves
            self.n_stale += 1
            return
        self.best_val_loss, self.best_iteration, self.n_stale = val_loss, self.iteration, 0
        if self.config.keep_best and self.best_path is not None:
            save_checkpoint(self.best_path, self.snf, iteration=self.iteration, val_loss=val_loss,
                            train_config=asdict(self.config))

    @property
    def stopped_early(self) -> bool:
        """Whether ``patience`` validations in a row brought no improvement (training stops)."""
        return bool(self.config.patience) and self.n_stale >= self.config.patience

    def _samples_now(self) -> bool:
        """Whether this iteration draws weighted samples (reverse KL, or an ESS/acceptance check)."""
        cfg = self.config
        return cfg.weight_reverse > 0 or bool(cfg.ess_every and self.iteration % cfg.ess_every == 0)

    def _shard_loss(self, n: int, generator: torch.Generator):
        """(loss, forward term, reverse term, SNFSample or None) of one shard of ``n`` samples."""
        cfg, forward, reverse, sample = self.config, 0.0, 0.0, None
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if cfg.weight_forward > 0:
            if self.data_probs is None:
                index = torch.randint(len(self.data), (n,), generator=generator, device=self.device)
            else:
                index = torch.multinomial(self.data_probs, n, replacement=True, generator=generator)
            forward = self.snf.forward_kl_loss(self.data[index], generator=generator)
            loss = loss + cfg.weight_forward * forward
        if cfg.weight_reverse > 0:
            reverse, sample = self.snf.reverse_kl_loss(n, generator=generator,
                                                       energy_regularizer=self.energy_regularizer)
            loss = loss + cfg.weight_reverse * reverse
        elif self._samples_now():
            self.snf.eval()
            sample = self.snf.sample(n, generator=generator)
            self.snf.train()
        return loss, forward, reverse, sample

    def _float_buffers(self) -> list:
        """The model's floating-point buffers: state a training pass may change (adaptive MC step sizes)."""
        return [b for b in self.snf.buffers() if b.is_floating_point()]

    def _stats_size(self, keys: list) -> tuple[int, int]:
        """(length of the statistics before the buffer part, length of the buffer part) of this iteration."""
        sampled = self.config.batch_size + len(keys) if self._samples_now() else 0
        return 5 + sampled, sum(b.numel() for b in self._float_buffers())

    def _accumulate(self, keys: list) -> torch.Tensor:
        """Backpropagate this process's shards, weighted by their share of the batch, and return its
        statistics: [loss, forward, reverse, non-finite shards, 0, log weights (B) if sampled,
        acceptance per key if sampled, float buffers]; shards of other ranks leave zeros (summed over
        ranks later). Every shard starts from the iteration's buffers; the new buffers are the mean of
        the shards' results weighted by their share (a single shard keeps its own exactly)."""
        batch, (head, _) = self.config.batch_size, self._stats_size(keys)
        buffers = self._float_buffers()
        start = [b.clone() for b in buffers]
        stats = torch.zeros(sum(self._stats_size(keys)), dtype=torch.float64, device=self.device)
        offsets = [sum(self.shard_sizes[:k]) for k in range(self.n_shards)]
        for k, generator in self.generators.items():
            share = self.shard_sizes[k] / batch
            for buffer, value in zip(buffers, start):
                buffer.copy_(value)
            loss, forward, reverse, sample = self._shard_loss(self.shard_sizes[k], generator)
            stats[:3] += share * torch.stack([loss.detach(), torch.as_tensor(forward).detach().to(stats),
                                              torch.as_tensor(reverse).detach().to(stats)])
            if torch.isfinite(loss):
                (share * loss).backward()
            else:
                stats[3] += 1
            if sample is not None:
                stats[5 + offsets[k]:5 + offsets[k] + self.shard_sizes[k]] = sample.log_weights
                stats[5 + batch:head] += share * torch.tensor([sample.acceptance[key] for key in keys],
                                                              dtype=torch.float64, device=self.device)
            if buffers:
                stats[head:] += share * torch.cat([b.detach().reshape(-1).to(stats) for b in buffers])
        return stats

    def _set_buffers(self, values: torch.Tensor) -> None:
        offset = 0
        for buffer in self._float_buffers():
            buffer.copy_(values[offset:offset + buffer.numel()].view(buffer.shape))
            offset += buffer.numel()

    def _metrics(self, stats: torch.Tensor, keys: list) -> dict:
        cfg, info = self.config, {}
        if cfg.weight_forward > 0:
            info["loss_forward"] = float(stats[1])
        if cfg.weight_reverse > 0:
            info["loss_reverse"] = float(stats[2])
        if len(stats) > 5:
            info.update(ess_fraction=kish_ess(stats[5:5 + cfg.batch_size]) / cfg.batch_size,
                        acceptance={key: float(value) for key, value in zip(keys, stats[5 + cfg.batch_size:])})
        return info

    def _gradients_and_stats(self) -> tuple[torch.Tensor, list]:
        """Gradients of all shards in ``p.grad`` and the summed statistics (see :meth:`_accumulate`).

        Distributed: one all-reduce sums both over the ranks; an exception on any rank is raised on
        every rank before the step is applied (the failing rank re-raises its own).
        """
        keys = list(self.snf.acceptance_rates())
        head, _ = self._stats_size(keys)
        if self.group is None:
            stats = self._accumulate(keys)
        else:
            error = None
            try:
                stats = self._accumulate(keys)
            except Exception as err:  # reported to the other ranks, then re-raised below
                error = err
                stats = torch.zeros(sum(self._stats_size(keys)), dtype=torch.float64, device=self.device)
                stats[4] = 1
            stats = sum_gradients(list(self.snf.parameters()), stats, self.group)
            if stats[4] > 0:
                if error is not None:
                    raise error
                raise DistributedError(f"{int(stats[4])} other rank(s) failed in iteration {self.iteration + 1}; "
                                       "stopping before the step (the last checkpoint is intact)")
        self._set_buffers(stats[head:])
        return stats[:head], keys

    def step(self) -> dict:
        """One optimizer iteration; returns its metrics (skipped steps are counted, not applied)."""
        lr = learning_rate_at(self.config, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats, keys = self._gradients_and_stats()
        loss, info = stats[0], self._metrics(stats, keys)
        grad_norm = float("nan")
        finite = bool(stats[3] == 0)
        if finite:
            params = [p for p in self.snf.parameters() if p.grad is not None]
            max_norm = self.config.clip_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.n_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {"iteration": self.iteration, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm,
                "skipped": not finite, "n_skipped": self.n_skipped, **info}

    def train(self, n_iterations: int | None = None) -> list[dict]:
        """Run until ``n_iterations`` (default config.n_iterations) total iterations, or until
        :attr:`stopped_early`; return the metrics (with ``val_loss`` every validate_every iterations)."""
        target = self.config.n_iterations if n_iterations is None else n_iterations
        history = []
        self.snf.train()
        bar = tqdm(total=target, initial=self.iteration, disable=None if self.progress and self.is_main else True,
                   desc="training")
        log = open(self.metrics_path, "a", encoding="utf-8") if self.metrics_path and self.is_main else None
        try:
            start = time.perf_counter()
            while self.iteration < target and not self.stopped_early:
                metrics = self.step()
                if self.val_data is not None and self.iteration % self.config.validate_every == 0:
                    metrics["val_loss"] = self.validate()
                    self._record_validation(metrics["val_loss"])
                metrics["elapsed_s"] = time.perf_counter() - start
                history.append(metrics)
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(_postfix(metrics))
                every = self.config.checkpoint_every
                if self.checkpoint_path is not None and every and self.iteration % every == 0:
                    self.save()
            if self.checkpoint_path is not None:
                self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
            self.snf.eval()
        return history


def _trim_metrics(path: Path, iteration: int) -> None:
    """Drop the metrics lines after ``iteration`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: after the checkpoint anyway
            continue
    if len(kept) == len(lines):
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _postfix(metrics: dict) -> dict:
    postfix = {"loss": f"{metrics['loss']:.3f}"}
    acceptance = metrics.get("acceptance")
    if acceptance:
        postfix["acc"] = f"{sum(acceptance.values()) / len(acceptance):.2f}"
    if "ess_fraction" in metrics:
        postfix["ess"] = f"{metrics['ess_fraction']:.2f}"
    if "val_loss" in metrics:
        postfix["val"] = f"{metrics['val_loss']:.3f}"
    if metrics["n_skipped"]:
        postfix["skipped"] = metrics["n_skipped"]
    return postfix

"""Training an SNF: forward KL (maximum likelihood on data), reverse KL (energy-based) and mixes.

The loss per iteration is
    L = weight_forward · (−mean log q(x_data)) + weight_reverse · (−mean log w_reg)
where log w_reg uses ``energy_regularizer(u_X)`` (e.g. a log cut of high energies) instead of the
raw target energy; reported ESS and acceptance rates always use raw energies.

Reliability: a step whose loss or gradient norm is not finite is skipped (never applied) and
counted; checkpoints (:mod:`openmm_snf.training.checkpoints`) are written to a temporary file and
renamed, and hold everything needed to resume bit-for-bit on the same device. Metrics go to a
JSON-lines file, one object per iteration (:mod:`openmm_snf.training.metrics`).

Validation (``validation_fraction`` > 0): the last fraction of the data frames (a contiguous block, so
that frames correlated in time with it mostly stay out of training too) is held out and never trained
on. Every ``validate_every`` iterations the forward-KL loss on it (mean −log q in eval mode under
``torch.no_grad()``, with a generator reseeded from ``seed`` so validations are comparable) is logged as
``val_loss``; with ``keep_best`` the best model so far is written to ``best.pt`` beside the checkpoint,
and ``patience`` validations without improvement stop training. Validation runs in single-process
training only (a process group with validation_fraction > 0 is an error).

Data parallelism (:mod:`openmm_snf.training.shards`, :mod:`openmm_snf.distributed`): the global batch
is cut into ``n_shards`` shards, each drawn with its own generator stream; with a process group the
shards are spread over the ranks, gradients and statistics are summed in one all-reduce, and only
rank 0 writes checkpoints and metrics. A run is defined by (seed, batch_size, n_shards): training on
W ranks equals single-process training with ``n_shards = W`` up to floating-point reduction order.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import broadcast_module, check_same_on_all_ranks, rank_of, world_size_of
from .flows.snf import SNF
from .training.checkpoints import (BEST_NAME, CheckpointError, TrainingState, check_checkpoint_model,
                                   load_checkpoint, load_snf, restore_training_checkpoint, save_checkpoint,
                                   save_training_checkpoint, saved_generator_states)
from .training.metrics import MetricsLog, progress_postfix
from .training.shards import Shards
from .weights import kish_ess

# the checkpoint names are defined in training.checkpoints and exported here too, where callers import them
__all__ = ["TrainConfig", "Trainer", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_checkpoint_model",
           "load_snf", "learning_rate_at", "split_validation", "BEST_NAME"]

LR_SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer` (the paper's ALDP: batch 128, 1000 iterations, Adam 1e-3).

    Attributes:
        n_iterations: optimizer steps in total (resumed runs continue up to this number).
        batch_size: samples per loss term.
        learning_rate: Adam's initial rate; lr_schedule: "constant", "cosine" or "exponential",
            decaying to learning_rate · lr_final_factor at the last iteration.
        weight_forward, weight_reverse: weights of the forward-KL and reverse-KL terms.
        reverse_start: when both terms are on, the share of n_iterations trained on the forward term
            alone before the reverse term joins, at iteration :attr:`reverse_from` (0: both from the
            start). There Adam's moments restart and the learning-rate schedule runs again over the
            remaining iterations, from where the first phase ended (learning_rate · lr_final_factor)
            down to learning_rate · lr_final_factor². Maximum likelihood on data that visit every
            state, then energy-based refinement of the density: the flow keeps the states the data
            showed and its importance weights spread far less.
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
    reverse_start: float = 0.0
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
        if not 0 <= self.reverse_start < 1:
            raise ValueError(f"reverse_start must be in [0, 1), got {self.reverse_start}")
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

    @property
    def reverse_from(self) -> int:
        """The iteration at which the reverse-KL term joins (0 unless both terms are on)."""
        both = self.weight_forward > 0 and self.weight_reverse > 0
        return round(self.reverse_start * self.n_iterations) if both else 0

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
    """Learning rate of ``iteration`` (0-based) under the configured schedule (run again from
    ``reverse_from`` on, one factor of lr_final_factor lower, when that is set)."""
    start, length, scale, switch = 0, config.n_iterations, config.learning_rate, config.reverse_from
    if switch:
        if iteration < switch:
            length = switch
        else:
            start, length = switch, config.n_iterations - switch
            scale *= config.lr_final_factor
    progress = min((iteration - start) / max(length - 1, 1), 1.0)
    final = config.lr_final_factor
    if config.lr_schedule == "cosine":
        factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    elif config.lr_schedule == "exponential":
        factor = final ** progress
    else:
        factor = 1.0
    return scale * factor


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
        self.progress = progress
        self.optimizer = torch.optim.Adam(snf.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
        self.group = process_group
        self.is_main = rank_of(process_group) == 0
        self.metrics = MetricsLog(metrics_path if self.is_main else None)
        self.state = TrainingState()
        checkpoint = None
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            checkpoint = load_checkpoint(self.checkpoint_path, map_location=self.device)
        n_shards = config.n_shards or (len(saved_generator_states(checkpoint)) if checkpoint is not None
                                       else world_size_of(process_group))
        self.shards = Shards(config.batch_size, n_shards, config.seed, process_group, self.device)
        if checkpoint is not None:
            self.state, generator_states = restore_training_checkpoint(checkpoint, self.checkpoint_path, snf,
                                                                       self.optimizer, n_shards)
            self.shards.set_generator_states(generator_states)
        if resume:
            self.metrics.trim(self.iteration)
        broadcast_module(snf, process_group)
        check_same_on_all_ranks((self.iteration, self.n_shards, config.batch_size, config.seed), process_group,
                                "(iteration, n_shards, batch_size, seed)")

    # where the run stands (:class:`~openmm_snf.training.checkpoints.TrainingState`), read by callers and tests
    iteration = property(lambda self: self.state.iteration)
    n_skipped = property(lambda self: self.state.n_skipped)
    best_val_loss = property(lambda self: self.state.best_val_loss)
    best_iteration = property(lambda self: self.state.best_iteration)
    n_stale = property(lambda self: self.state.n_stale)
    n_shards = property(lambda self: self.shards.n_shards)

    def save(self, path=None) -> Path | None:
        """Write a resumable checkpoint (atomically) and return its path.

        Distributed: every rank must call it (the shard generators are gathered); rank 0 writes and
        the others return None. A rank that has failed makes the gather, and so the write, fail.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path given")
        generator_states = self.shards.generator_states()
        if not self.is_main:
            return None
        save_training_checkpoint(path, self.snf, self.optimizer, self.state, asdict(self.config), generator_states)
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
        """Track the best validation, writing ``best.pt`` with keep_best."""
        if self.state.record_validation(val_loss) and self.config.keep_best and self.best_path is not None:
            save_checkpoint(self.best_path, self.snf, iteration=self.iteration, val_loss=val_loss,
                            train_config=asdict(self.config))

    @property
    def stopped_early(self) -> bool:
        """Whether ``patience`` validations in a row brought no improvement (training stops)."""
        return self.state.stopped_early(self.config.patience)

    @property
    def weight_reverse(self) -> float:
        """The reverse-KL weight of this iteration (0 before ``reverse_from``)."""
        return 0.0 if self.iteration < self.config.reverse_from else self.config.weight_reverse

    def _samples_now(self) -> bool:
        """Whether this iteration draws weighted samples (reverse KL, or an ESS/acceptance check)."""
        cfg = self.config
        return self.weight_reverse > 0 or bool(cfg.ess_every and self.iteration % cfg.ess_every == 0)

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
        if self.weight_reverse > 0:
            reverse, sample = self.snf.reverse_kl_loss(n, generator=generator,
                                                       energy_regularizer=self.energy_regularizer)
            loss = loss + self.weight_reverse * reverse
        elif self._samples_now():
            self.snf.eval()
            sample = self.snf.sample(n, generator=generator)
            self.snf.train()
        return loss, forward, reverse, sample

    def step(self) -> dict:
        """One optimizer iteration; returns its metrics (skipped steps are counted, not applied)."""
        lr = learning_rate_at(self.config, self.iteration)
        if self.iteration == self.config.reverse_from > 0:
            self.optimizer.state.clear()            # a new loss: Adam's moments start afresh
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        keys, reverse = list(self.snf.acceptance_rates()), self.weight_reverse > 0
        stats = self.shards.accumulate(self.snf, self._shard_loss, keys, self._samples_now(), self.iteration)
        grad_norm = float("nan")
        finite = stats.scalar("n_nonfinite") == 0
        if finite:
            params = [p for p in self.snf.parameters() if p.grad is not None]
            max_norm = self.config.clip_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.state.n_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.iteration += 1
        return {"iteration": self.iteration, "loss": stats.scalar("loss"), "lr": lr, "grad_norm": grad_norm,
                "skipped": not finite, "n_skipped": self.n_skipped, **self._sample_metrics(stats, keys, reverse)}

    def _sample_metrics(self, stats, keys: list, reverse: bool) -> dict:
        """The loss terms in use and, when the iteration sampled, its ESS fraction and acceptance rates."""
        cfg, info = self.config, {}
        if cfg.weight_forward > 0:
            info["loss_forward"] = stats.scalar("forward")
        if reverse:
            info["loss_reverse"] = stats.scalar("reverse")
        if "log_weights" in stats:
            info.update(ess_fraction=kish_ess(stats["log_weights"]) / cfg.batch_size,
                        acceptance={key: float(value) for key, value in zip(keys, stats["acceptance"])})
        return info

    def train(self, n_iterations: int | None = None) -> list[dict]:
        """Run until ``n_iterations`` (default config.n_iterations) total iterations, or until
        :attr:`stopped_early`; return the metrics (with ``val_loss`` every validate_every iterations)."""
        target = self.config.n_iterations if n_iterations is None else n_iterations
        history = []
        self.snf.train()
        try:
            with tqdm(total=target, initial=self.iteration, disable=None if self.progress and self.is_main else True,
                      desc="training") as bar, self.metrics as log:
                start = time.perf_counter()
                while self.iteration < target and not self.stopped_early:
                    metrics = self.step()
                    if self.val_data is not None and self.iteration % self.config.validate_every == 0:
                        metrics["val_loss"] = self.validate()
                        self._record_validation(metrics["val_loss"])
                    metrics["elapsed_s"] = time.perf_counter() - start
                    history.append(metrics)
                    log.write(metrics)
                    bar.update(1)
                    bar.set_postfix(progress_postfix(metrics))
                    every = self.config.checkpoint_every
                    if self.checkpoint_path is not None and every and self.iteration % every == 0:
                        self.save()
                if self.checkpoint_path is not None:
                    self.save()
        finally:
            self.snf.eval()
        return history

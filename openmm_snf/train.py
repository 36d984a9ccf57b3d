"""Training an SNF: forward KL (maximum likelihood on data), reverse KL (energy-based) and mixes.

The loss per iteration is
    L = weight_forward · (−mean log q(x_data)) + weight_reverse · (−mean log w_reg)
where log w_reg uses ``energy_regularizer(u_X)`` (e.g. a log cut of high energies) instead of the
raw target energy; reported ESS and acceptance rates always use raw energies.

Reliability: a step whose loss or gradient norm is not finite is skipped (never applied) and
counted; checkpoints are written to a temporary file and renamed, and hold everything needed to
resume bit-for-bit on the same device (model, optimizer, iteration, RNG state, skip count).
Metrics go to a JSON-lines file, one object per iteration.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .flows.builder import build_snf_from_config
from .flows.snf import SNF

__all__ = ["TrainConfig", "Trainer", "save_checkpoint", "load_checkpoint", "load_snf", "learning_rate_at"]

CHECKPOINT_FORMAT = "openmm-snf-checkpoint-v1"
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
        clip_grad_norm: gradient norm clipping (None: off).
        weight_decay: Adam weight decay.
        checkpoint_every: iterations between checkpoints (0: only at the end).
        ess_every: when weight_reverse is 0, draw a monitoring batch every this many iterations for
            ESS and acceptance (0: never); it costs batch_size extra samples.
        seed: seeds the trainer's generator (minibatches and all noise).
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

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.n_iterations < 0 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("need n_iterations >= 0, batch_size >= 1 and learning_rate > 0")
        if self.weight_forward < 0 or self.weight_reverse < 0 or self.weight_forward + self.weight_reverse == 0:
            raise ValueError("weight_forward and weight_reverse must be >= 0 and not both 0")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


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


def load_checkpoint(path, map_location=None) -> dict:
    """Read a checkpoint dict, checking its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an openmm-snf checkpoint (expected format {CHECKPOINT_FORMAT})")
    return data


def load_snf(path, target_energy, transform=None, map_location=None) -> SNF:
    """Rebuild an SNF from a checkpoint; pass the same target energy and transform as in training."""
    data = load_checkpoint(path, map_location)
    snf = build_snf_from_config(data["snf_config"], target_energy, transform)
    snf.load_state_dict(data["model"])
    return snf.eval()


class Trainer:
    """Adam training of an SNF with mixed forward/reverse KL, checkpoints and a metrics log.

    Args:
        snf: the model (from :func:`~openmm_snf.flows.build_snf` if checkpoints are wanted).
        config: :class:`TrainConfig`.
        data: data-space samples (N, ...) for the forward-KL term (required if weight_forward > 0),
            e.g. (N, n_atoms, 3) nm from MD; moved to the model's device and dtype.
        energy_regularizer: maps raw reduced energies (B,) to those used in the reverse-KL loss.
        checkpoint_path: where to write checkpoints; if it exists and ``resume`` is True, training
            continues from it.
        metrics_path: JSON-lines file, one object per iteration (appended to when resuming).
        progress: show a tqdm bar (loss, acceptance, ESS, skipped steps).
    """

    def __init__(self, snf: SNF, config: TrainConfig, *, data: torch.Tensor | None = None,
                 energy_regularizer=None, checkpoint_path=None, metrics_path=None, resume: bool = True,
                 progress: bool = True):
        self.snf = snf
        self.config = config
        self.device, dtype = snf.prior.device, snf.prior.dtype
        if config.weight_forward > 0:
            if data is None or len(data) < 1:
                raise ValueError("weight_forward > 0 needs data (N, ...) for the forward-KL term")
            data = torch.as_tensor(data).to(self.device, dtype)
            if not torch.isfinite(data).all():
                raise ValueError("training data contain NaN or infinite values")
        self.data = data
        self.energy_regularizer = energy_regularizer
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.metrics_path = None if metrics_path is None else Path(metrics_path)
        self.progress = progress
        self.optimizer = torch.optim.Adam(snf.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.iteration = 0
        self.n_skipped = 0
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self._restore(load_checkpoint(self.checkpoint_path, map_location=self.device))

    def _restore(self, state: dict) -> None:
        self.snf.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator_state"].to("cpu"))
        self.iteration = int(state["iteration"])
        self.n_skipped = int(state["n_skipped"])

    def save(self, path=None) -> Path:
        """Write a resumable checkpoint (atomically) and return its path."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path given")
        save_checkpoint(path, self.snf, optimizer=self.optimizer.state_dict(),
                        generator_state=self.generator.get_state(), iteration=self.iteration,
                        n_skipped=self.n_skipped, train_config=asdict(self.config))
        return path

    def _loss(self) -> tuple[torch.Tensor, dict]:
        cfg, info = self.config, {}
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if cfg.weight_forward > 0:
            index = torch.randint(len(self.data), (cfg.batch_size,), generator=self.generator,
                                  device=self.device)
            forward = self.snf.forward_kl_loss(self.data[index], generator=self.generator)
            info["loss_forward"] = float(forward.detach())
            loss = loss + cfg.weight_forward * forward
        if cfg.weight_reverse > 0:
            reverse, sample = self.snf.reverse_kl_loss(cfg.batch_size, generator=self.generator,
                                                       energy_regularizer=self.energy_regularizer)
            info.update(loss_reverse=float(reverse.detach()), ess_fraction=sample.ess / cfg.batch_size,
                        acceptance=sample.acceptance)
            loss = loss + cfg.weight_reverse * reverse
        elif cfg.ess_every and self.iteration % cfg.ess_every == 0:
            self.snf.eval()
            sample = self.snf.sample(cfg.batch_size, generator=self.generator)
            self.snf.train()
            info.update(ess_fraction=sample.ess / cfg.batch_size, acceptance=sample.acceptance)
        return loss, info

    def step(self) -> dict:
        """One optimizer iteration; returns its metrics (skipped steps are counted, not applied)."""
        lr = learning_rate_at(self.config, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = self._loss()
        grad_norm = float("nan")
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
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
        """Run until ``n_iterations`` (default config.n_iterations) total iterations; return metrics."""
        target = self.config.n_iterations if n_iterations is None else n_iterations
        history = []
        self.snf.train()
        bar = tqdm(total=target, initial=self.iteration, disable=not self.progress, desc="training")
        log = open(self.metrics_path, "a", encoding="utf-8") if self.metrics_path is not None else None
        try:
            start = time.perf_counter()
            while self.iteration < target:
                metrics = self.step()
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


def _postfix(metrics: dict) -> dict:
    postfix = {"loss": f"{metrics['loss']:.3f}"}
    acceptance = metrics.get("acceptance")
    if acceptance:
        postfix["acc"] = f"{sum(acceptance.values()) / len(acceptance):.2f}"
    if "ess_fraction" in metrics:
        postfix["ess"] = f"{metrics['ess_fraction']:.2f}"
    if metrics["n_skipped"]:
        postfix["skipped"] = metrics["n_skipped"]
    return postfix

"""The metrics of a training run: a JSON-lines log, one object per iteration, and the progress bar's
summary of them.

Keys of an iteration's object: ``iteration``, ``loss``, ``lr``, ``grad_norm``, ``skipped``,
``n_skipped``, ``elapsed_s``; ``loss_forward`` / ``loss_reverse`` for the terms in use; when the
iteration sampled, ``ess_fraction`` and ``acceptance`` ({stochastic block name: rate}, see
:meth:`~openmm_snf.flows.snf.SNF.acceptance_rates`); ``val_loss`` on validation iterations.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["MetricsLog", "progress_postfix"]


class MetricsLog:
    """Appends one JSON object per iteration to ``path`` (None: writes nothing); a context manager.

    A resumed run first calls :meth:`trim` so that the iterations after its checkpoint, logged before
    it stopped, are not logged twice.
    """

    def __init__(self, path):
        self.path = None if path is None else Path(path)
        self._handle = None

    def __enter__(self) -> "MetricsLog":
        if self.path is not None:
            self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, metrics: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(metrics) + "\n")
            self._handle.flush()

    def trim(self, iteration: int) -> None:
        """Drop the lines after ``iteration`` (atomically; a line cut short by a kill goes too)."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line)["iteration"] <= iteration:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill: after the checkpoint anyway
                continue
        if len(kept) == len(lines):
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(kept)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def progress_postfix(metrics: dict) -> dict:
    """The progress bar's short summary of an iteration: loss, mean acceptance, ESS, validation, skips."""
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

"""``summary.json``: the numbers a command printed, as strict JSON (RFC 8259: no NaN or Infinity).

Python's ``json`` writes ``NaN`` and ``Infinity``, which other JSON readers refuse. Here every non-finite
float becomes ``null`` and the summary gains an ``"error"`` naming those fields, so a reader can tell a
missing value from a failed estimate. Commands build one dictionary and call :func:`write_summary`
(or :func:`strict_json` to print it); anyone adding a field only adds a key.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .io import atomic_outputs

__all__ = ["strict_json", "write_summary"]


def _finite(value, where: str, bad: list[str]):
    """A copy of ``value`` with numpy scalars/arrays as Python values and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _finite(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(np.asarray(value).tolist()
                                                                        if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(f"{where}={value}")
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def strict_json(fields: dict, *, indent: int | None = 2) -> str:
    """``fields`` as strict JSON text; non-finite numbers become null and are listed under ``"error"``."""
    bad: list[str] = []
    clean = _finite(dict(fields), "", bad)
    if bad:
        clean["error"] = "not finite, written as null: " + ", ".join(bad)
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_summary(path, fields: dict) -> Path:
    """Write :func:`strict_json` of ``fields`` to ``path`` atomically (replacing an older summary)."""
    path = Path(os.fspath(path))
    with atomic_outputs([path], force=True) as (temporary,):
        temporary.write_text(strict_json(fields) + "\n")
    return path

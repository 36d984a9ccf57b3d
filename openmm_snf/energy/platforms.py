"""Choose an OpenMM platform and its properties (the one place that knows platform names).

``make_platform(None)`` picks the fastest available: CUDA, then OpenCL, then CPU, then Reference.
CUDA/OpenCL take ``precision`` ("mixed" by default, "double" or "single"); CPU takes ``threads``.
:func:`set_process_defaults` sets the device and thread count of every Context this process creates
afterwards without an explicit value (one rank of a distributed job).
"""
from __future__ import annotations

import openmm

__all__ = ["available_platforms", "make_platform", "set_process_defaults"]

_PREFERENCE = ("CUDA", "OpenCL", "CPU", "Reference")


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that loaded on this machine."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def make_platform(name: str | None = None, *, precision: str = "mixed",
                  threads: int | None = None) -> tuple[openmm.Platform, dict]:
    """Return (platform, properties) for ``openmm.Context(system, integrator, platform, properties)``.

    Raises ValueError naming the available platforms when ``name`` is not one of them.
    """
    available = available_platforms()
    if name is None:
        name = next(p for p in _PREFERENCE if p in available)
    match = {p.lower(): p for p in available}.get(str(name).lower())
    if match is None:
        raise ValueError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)}")
    properties = {}
    if match in ("CUDA", "OpenCL"):
        if precision not in ("mixed", "double", "single"):
            raise ValueError(f"precision must be mixed, double or single, got {precision!r}")
        properties["Precision"] = precision
    if match == "CPU" and threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        properties["Threads"] = str(int(threads))
    return openmm.Platform.getPlatformByName(match), properties


def set_process_defaults(*, threads: int | None = None, device_index: int | None = None) -> None:
    """Default CPU ``Threads`` and CUDA/OpenCL ``DeviceIndex`` of the Contexts this process makes from now on.

    Explicit properties (``make_platform(threads=...)``) still win. Platforms not loaded here are skipped.
    """
    available = available_platforms()
    if threads is not None and "CPU" in available:
        openmm.Platform.getPlatformByName("CPU").setPropertyDefaultValue("Threads", str(int(threads)))
    if device_index is not None:
        for name in ("CUDA", "OpenCL"):
            if name in available:
                openmm.Platform.getPlatformByName(name).setPropertyDefaultValue("DeviceIndex", str(int(device_index)))

"""Choose an OpenMM platform and its properties (the one place that knows platform names).

``make_platform(None)`` (or "auto") takes the first usable of :func:`auto_candidates`: CUDA, then
OpenCL on a GPU device (an OpenCL runtime for the CPU such as pocl is never chosen: it ran 6x slower
than the CPU route and crashed on tiny batches), then CPU, then Reference; "usable" means a
one-particle Context can be created. :func:`choose_platform` also says why. On CPU and Reference,
:class:`~openmm_snf.energy.OpenMMEnergy` computes energies and forces with its compiled float64
kernel; md, umbrella, train and sample all take this same choice.
CUDA/OpenCL take ``precision`` ("mixed" by default, "double" or "single"); CPU takes ``threads``.
:func:`set_process_defaults` sets the device and thread count of every Context this process creates
afterwards without an explicit value (one rank of a distributed job).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses

import openmm

__all__ = ["PlatformChoice", "auto_candidates", "available_platforms", "choose_platform", "make_platform",
           "opencl_gpu_devices", "platform_properties", "set_process_defaults", "usable"]

_CL_DEVICE_TYPE = 0x1000  # clGetDeviceInfo parameter
_CL_DEVICE_TYPE_GPU = 1 << 2
_CL_DEVICE_TYPE_ALL = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class PlatformChoice:
    """A platform name, the properties that select its device, and why it was chosen (one line)."""

    name: str
    properties: dict
    reason: str


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that loaded on this machine."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def opencl_gpu_devices() -> list[tuple[int, int]]:
    """(OpenCL platform index, device index) of every OpenCL GPU, asked of the ICD loader; [] without one.

    The indices are OpenMM's ``OpenCLPlatformIndex`` and ``DeviceIndex`` (all devices of a platform,
    in the loader's order).
    """
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("OpenCL") or "libOpenCL.so.1")
    except OSError:
        return []
    lib.clGetPlatformIDs.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.clGetDeviceIDs.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_uint32)]
    lib.clGetDeviceInfo.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p,
                                    ctypes.c_void_p]
    count = ctypes.c_uint32(0)
    if lib.clGetPlatformIDs(0, None, ctypes.byref(count)) != 0 or count.value == 0:
        return []
    platforms = (ctypes.c_void_p * count.value)()
    lib.clGetPlatformIDs(count.value, platforms, None)
    found = []
    for p, platform in enumerate(platforms):
        n = ctypes.c_uint32(0)
        if lib.clGetDeviceIDs(platform, _CL_DEVICE_TYPE_ALL, 0, None, ctypes.byref(n)) != 0 or n.value == 0:
            continue
        devices = (ctypes.c_void_p * n.value)()
        lib.clGetDeviceIDs(platform, _CL_DEVICE_TYPE_ALL, n.value, devices, None)
        for d, device in enumerate(devices):
            kind = ctypes.c_uint64(0)
            if lib.clGetDeviceInfo(device, _CL_DEVICE_TYPE, 8, ctypes.byref(kind), None) == 0 \
                    and kind.value & _CL_DEVICE_TYPE_GPU:
                found.append((p, d))
    return found


def auto_candidates() -> list[PlatformChoice]:
    """The platforms "auto" tries, fastest first: CUDA, OpenCL on a GPU, CPU, Reference (those loaded)."""
    available = available_platforms()
    candidates, skipped = [], []
    if "CUDA" in available:
        candidates.append(PlatformChoice("CUDA", {}, "CUDA: a GPU"))
    if "OpenCL" in available:
        gpus = opencl_gpu_devices()
        if gpus:
            platform_index, device_index = gpus[0]
            properties = {"OpenCLPlatformIndex": str(platform_index)}
            if device_index:  # else the rank's default DeviceIndex (set_process_defaults) still applies
                properties["DeviceIndex"] = str(device_index)
            candidates.append(PlatformChoice("OpenCL", properties, "OpenCL on a GPU"))
        else:
            skipped.append("OpenCL has no GPU device")
    note = f" ({'; '.join(skipped)})" if skipped else ""
    if "CPU" in available:
        candidates.append(PlatformChoice("CPU", {}, f"CPU: no usable GPU platform{note}"))
    candidates.append(PlatformChoice("Reference", {}, f"Reference: no GPU or CPU platform{note}"))
    return candidates


def usable(choice: PlatformChoice) -> bool:
    """Whether a one-particle Context can be created on ``choice`` (a GPU platform without a device cannot)."""
    system = openmm.System()
    system.addParticle(1.0)
    try:
        openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(choice.name),
                       dict(choice.properties))
    except Exception:  # OpenMM raises plain Exceptions (OpenMMException) for a missing device or driver
        return False
    return True


def choose_platform(name: str | None = None) -> PlatformChoice:
    """The platform ``name`` names, or for None/"auto" the first usable of :func:`auto_candidates`.

    Raises ValueError naming the available platforms when ``name`` is not one of them.
    """
    if name is None or str(name).lower() == "auto":
        for choice in auto_candidates():
            if usable(choice):
                return choice
        raise ValueError("no OpenMM platform can create a Context here")
    available = available_platforms()
    match = {p.lower(): p for p in available}.get(str(name).lower())
    if match is None:
        raise ValueError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)}")
    return PlatformChoice(match, {}, "chosen by name")


def make_platform(name: str | None = None, *, precision: str = "mixed",
                  threads: int | None = None) -> tuple[openmm.Platform, dict]:
    """Return (platform, properties) for ``openmm.Context(system, integrator, platform, properties)``.

    ``name`` None or "auto": see :func:`choose_platform`. Raises ValueError naming the available
    platforms when ``name`` is not one of them.
    """
    choice = choose_platform(name)
    return platform_properties(choice, precision=precision, threads=threads)


def platform_properties(choice: PlatformChoice, *, precision: str = "mixed",
                        threads: int | None = None) -> tuple[openmm.Platform, dict]:
    """(platform, properties) of a :class:`PlatformChoice` with the precision or thread count set."""
    if precision not in ("mixed", "double", "single"):  # checked on every platform: a typo is never ignored
        raise ValueError(f"precision must be mixed, double or single, got {precision!r}")
    properties = dict(choice.properties)
    if choice.name in ("CUDA", "OpenCL"):
        properties["Precision"] = precision
    if choice.name == "CPU" and threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        properties["Threads"] = str(int(threads))
    return openmm.Platform.getPlatformByName(choice.name), properties


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

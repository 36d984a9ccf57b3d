"""User-facing trajectory files: DCD + PDB topology, and the weight sidecar of a weighted trajectory.

For ``samples.dcd`` the outputs are, side by side:

* ``samples.dcd``          coordinates, readable by ``mdtraj.load("samples.dcd", top="samples.pdb")``;
* ``samples.pdb``          the topology (first frame as coordinates);
* ``samples.weights.npz``  ``log_weights``, ``weights`` (normalized), ``reduced_energies`` (u = U/kT), extras;
* ``samples.weights.csv``  the same per-frame columns for spreadsheet users.

Every file is written under a temporary name in the destination folder and renamed into place only
after all of them were written, so an interrupted run never leaves a half-written file at a final path.
The files of one trajectory are claimed as a set: writing an unweighted ``samples.dcd`` also removes a
stale ``samples.weights.npz/.csv`` of an earlier weighted one, and the sidecar records a fingerprint
(SHA-256) of the DCD it belongs to, so a sidecar is never applied to another trajectory. Existing outputs
are never overwritten unless ``force=True``; all of them are checked before anything is written. A DCD
whose header promises more frames than the file holds (a truncated copy) is refused. Bad input raises a
:class:`TrajectoryIOError` whose message names the file and the problem.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .systems import as_mdtraj_topology
from .weights import kish_ess, normalized_weights

__all__ = ["TrajectoryIOError", "OutputExistsError", "InputError", "TrajectoryPaths", "WeightedTrajectory",
           "ResampleResult", "trajectory_paths", "atomic_outputs", "check_outputs_free", "check_not_inputs",
           "read_structure", "write_trajectory",
           "read_trajectory", "write_weighted_trajectory", "read_weighted_trajectory", "resample",
           "write_resampled_trajectory"]


class TrajectoryIOError(ValueError):
    """Base class of the errors raised by :mod:`openmm_snf.io` (and by the plot writers)."""


class OutputExistsError(TrajectoryIOError):
    """An output file exists already and ``force`` was not given; nothing was written."""


class InputError(TrajectoryIOError):
    """An input file is missing, unreadable or inconsistent (atom counts, weight lengths, non-finite values)."""


@dataclass(frozen=True)
class TrajectoryPaths:
    """The files that make up one trajectory: ``dcd``, its topology ``pdb``, the weight sidecars ``npz``/``csv``."""

    dcd: Path
    pdb: Path
    npz: Path
    csv: Path

    @property
    def all(self) -> list[Path]:
        """Every file of the set (an unweighted write removes the stale sidecars among them)."""
        return [self.dcd, self.pdb, self.npz, self.csv]


def trajectory_paths(path_dcd) -> TrajectoryPaths:
    """The companion paths of ``path_dcd`` (``x.dcd`` -> ``x.pdb``, ``x.weights.npz``, ``x.weights.csv``)."""
    dcd = Path(os.fspath(path_dcd))
    if dcd.suffix.lower() != ".dcd":
        raise InputError(f"{dcd}: trajectory files must end in .dcd (got {dcd.suffix or 'no suffix'!r})")
    stem = dcd.with_suffix("")
    return TrajectoryPaths(dcd=dcd, pdb=stem.with_suffix(".pdb"), npz=Path(f"{stem}.weights.npz"),
                           csv=Path(f"{stem}.weights.csv"))


def check_outputs_free(paths, force: bool = False) -> None:
    """Check before any work that ``paths`` can be written: none exists (unless ``force``), none is a
    folder, and each one's folder exists and accepts a new file (a probe file is created and removed).

    Raises :class:`OutputExistsError` naming every existing path, or :class:`InputError`.
    """
    paths = [Path(os.fspath(p)) for p in paths]
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise InputError(f"output {', '.join(folders)} is a folder; give a file name")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"output exists: {', '.join(existing)}; choose another name or use --force "
                                "(force=True) to overwrite")
    for parent in dict.fromkeys(p.parent for p in paths):
        if not parent.is_dir():
            raise InputError(f"cannot write in {parent}: folder {parent} does not exist")
        try:
            handle, probe = tempfile.mkstemp(prefix=".openmm-snf-probe.", dir=parent)
        except OSError as err:
            raise InputError(f"cannot write in {parent}: {err.strerror or err}") from err
        os.close(handle)
        os.unlink(probe)


def check_not_inputs(outputs, inputs) -> None:
    """Raise :class:`InputError` if an output path is one of the ``inputs`` (same file, any spelling)."""
    inputs = [Path(os.fspath(p)) for p in inputs if p is not None]
    for output in (Path(os.fspath(p)) for p in outputs):
        for source in inputs:
            if output.exists() and source.exists() and os.path.samefile(output, source) or \
                    output.resolve() == source.resolve():
                raise InputError(f"output {output} is an input of this command ({source}); write the output "
                                 "under another name")


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_outputs(paths, force: bool = False, *, stale=()):
    """Context manager yielding temporary paths (same folder and suffix) for the final ``paths``.

    On normal exit the ``stale`` paths (files of the same set that this write does not produce, e.g.
    an old weights sidecar beside a new unweighted DCD) are removed, then the temporaries are renamed
    onto the final paths (last path last, so put the main file there); on an exception the
    temporaries are removed and the final paths are left as they were. ``stale`` paths count as
    outputs for ``force``.
    """
    finals = [Path(os.fspath(p)) for p in paths]
    stale = [Path(os.fspath(p)) for p in stale]
    check_outputs_free(finals + stale, force)
    temps = []
    try:
        for final in finals:
            handle, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}",
                                            dir=final.parent)
            os.close(handle)
            temps.append(Path(name))
        yield temps
        for path in stale:
            path.unlink(missing_ok=True)
        mode = _default_file_mode()
        for temp, final in zip(temps, finals):
            os.chmod(temp, mode)  # mkstemp creates 0600; give the file the mode open() would have
            os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _to_numpy(values) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _checked_xyz(xyz, n_atoms: int) -> np.ndarray:
    xyz = _to_numpy(xyz).astype(np.float64)
    if xyz.ndim == 2:
        xyz = xyz[None]
    if xyz.ndim != 3 or xyz.shape[1:] != (n_atoms, 3) or xyz.shape[0] == 0:
        raise InputError(f"coordinates must have shape (n_frames, {n_atoms}, 3) for a topology of {n_atoms} "
                         f"atoms, got {xyz.shape}")
    bad = np.flatnonzero(~np.isfinite(xyz).all(axis=(1, 2)))
    if bad.size:
        raise InputError(f"coordinates of frame(s) {_first_frames(bad)} are not finite")
    return xyz


@contextlib.contextmanager
def _silenced_c_stdout():
    """Route file descriptor 1 to /dev/null: mdtraj's DCD reader prints banners from C, which would
    corrupt machine-readable output (e.g. ``--json``) of the caller."""
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _first_frames(indices, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _checked_per_frame(values, n_frames: int, name: str, origin: str) -> np.ndarray:
    values = _to_numpy(values).astype(np.float64)
    if values.shape != (n_frames,):
        raise InputError(f"{origin}: {name} has shape {values.shape}, expected ({n_frames},) - one value per "
                         f"frame of the trajectory")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InputError(f"{origin}: {name} is not finite (nan or inf) at frame(s) {_first_frames(bad)}")
    return values


def _write_dcd_and_pdb(temp_dcd: Path, temp_pdb: Path, top, xyz: np.ndarray, frame_time=None) -> None:
    """PDB topology and DCD; with ``frame_time = (timestep_fs, steps_per_frame)`` the DCD header carries the
    MD time step and save interval (written by OpenMM's DCDFile, as OpenMM's DCDReporter does; VMD, MDAnalysis
    and cpptraj read it; mdtraj numbers frames 0, 1, ...)."""
    import mdtraj
    traj = mdtraj.Trajectory(xyz, top)
    traj[0].save_pdb(str(temp_pdb), force_overwrite=True)
    if frame_time is None:
        traj.save_dcd(str(temp_dcd), force_overwrite=True)
        return
    import openmm.app as app
    import openmm.unit as unit
    timestep_fs, steps_per_frame = frame_time
    with open(temp_dcd, "wb") as handle:
        dcd = app.DCDFile(handle, top.to_openmm(), timestep_fs * unit.femtoseconds, firstStep=int(steps_per_frame),
                          interval=int(steps_per_frame))
        for frame in xyz:
            dcd.writeModel(frame * unit.nanometers)


def write_trajectory(path_dcd, topology, xyz, *, force: bool = False, frame_time=None) -> TrajectoryPaths:
    """Write an unweighted trajectory (e.g. reference MD): ``path_dcd`` and the PDB topology beside it.

    Args:
        path_dcd: output ``.dcd`` path.
        topology: MolecularSystem, ``openmm.app.Topology`` or ``mdtraj.Topology``.
        xyz: (n_frames, n_atoms, 3) float array in nm (a single (n_atoms, 3) frame is accepted).
        force: overwrite existing outputs.
        frame_time: ``(timestep_fs, steps_per_frame)`` of MD frames, stored in the DCD header (default: none).
    Returns:
        the :class:`TrajectoryPaths` (its ``npz``/``csv`` are not written).
    """
    paths = trajectory_paths(path_dcd)
    top = as_mdtraj_topology(topology)
    xyz = _checked_xyz(xyz, top.n_atoms)
    with atomic_outputs([paths.pdb, paths.dcd], force, stale=[paths.npz, paths.csv]) as (tmp_pdb, tmp_dcd):
        _write_dcd_and_pdb(tmp_dcd, tmp_pdb, top, xyz, frame_time)
    return paths


def _write_weights_csv(path: Path, columns: dict) -> None:
    names = list(columns)
    table = np.column_stack([np.arange(len(columns[names[0]]))] + [columns[n] for n in names])
    np.savetxt(path, table, delimiter=",", header=",".join(["frame"] + names), comments="",
               fmt=["%d"] + ["%.17g"] * len(names))


def write_weighted_trajectory(path_dcd, topology, xyz, log_weights, reduced_energies, *, force: bool = False,
                              extra: dict | None = None, frame_time=None) -> TrajectoryPaths:
    """Write weighted samples: DCD, PDB topology, ``.weights.npz`` and ``.weights.csv`` (all atomic).

    Args:
        path_dcd: output ``.dcd`` path.
        topology: MolecularSystem, ``openmm.app.Topology`` or ``mdtraj.Topology``.
        xyz: (n_frames, n_atoms, 3) float array in nm (numpy or torch).
        log_weights: (n_frames,) importance log weights (any additive constant), finite.
        reduced_energies: (n_frames,) target reduced energies u = U/kT, finite.
        force: overwrite existing outputs.
        extra: more arrays/scalars for the npz (e.g. ``{"temperature": 300.0}``); 1-D arrays of length
            n_frames also become CSV columns.
        frame_time: ``(timestep_fs, steps_per_frame)`` of MD frames (e.g. umbrella windows), for the DCD header.
    """
    paths = trajectory_paths(path_dcd)
    top = as_mdtraj_topology(topology)
    xyz = _checked_xyz(xyz, top.n_atoms)
    n = xyz.shape[0]
    log_w = _checked_per_frame(log_weights, n, "log_weights", "write_weighted_trajectory")
    energies = _checked_per_frame(reduced_energies, n, "reduced_energies", "write_weighted_trajectory")
    arrays = {"log_weights": log_w, "weights": normalized_weights(log_w), "reduced_energies": energies}
    for key, value in (extra or {}).items():
        if key in arrays:
            raise InputError(f"extra key {key!r} would shadow a standard sidecar field")
        arrays[key] = _to_numpy(value)
        if arrays[key].dtype.kind not in "biufcUS":
            raise InputError(f"extra field {key!r} must be numeric or text for the npz sidecar, got "
                             f"{arrays[key].dtype} ({type(value).__name__})")
    columns = {k: v for k, v in arrays.items() if v.ndim == 1 and v.shape[0] == n and v.dtype.kind in "biuf"}
    if DCD_FINGERPRINT in arrays:
        raise InputError(f"extra key {DCD_FINGERPRINT!r} would shadow a standard sidecar field")
    with atomic_outputs([paths.npz, paths.csv, paths.pdb, paths.dcd], force) as (t_npz, t_csv, t_pdb, t_dcd):
        _write_dcd_and_pdb(t_dcd, t_pdb, top, xyz, frame_time)
        with open(t_npz, "wb") as handle:
            np.savez(handle, **arrays, **{DCD_FINGERPRINT: _fingerprint(t_dcd)})
        _write_weights_csv(t_csv, columns)
    return paths


DCD_FINGERPRINT = "dcd_sha256"  # sidecar field: the SHA-256 of the DCD the weights belong to


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_file(path: Path, what: str, hint: str = "") -> None:
    if not path.is_file():
        raise InputError(f"{what} not found: {path}{hint}")


def read_trajectory(path_dcd, top=None):
    """Read a DCD with its topology (default: the PDB beside it) into an ``mdtraj.Trajectory`` (nm).

    Raises :class:`InputError` for a missing or unreadable file and for an atom-count mismatch.
    """
    import mdtraj
    paths = trajectory_paths(path_dcd)
    _require_file(paths.dcd, "trajectory file")
    if top is None:
        _require_file(paths.pdb, "topology file", " (expected beside the DCD; pass the topology explicitly)")
        top = paths.pdb
    if isinstance(top, (str, os.PathLike)):
        _require_file(Path(top), "topology file")
        try:
            topology = mdtraj.load_topology(os.fspath(top))
        except Exception as err:  # mdtraj raises assorted errors for malformed files
            raise InputError(f"could not read topology {top}: {err}") from err
    else:
        topology = as_mdtraj_topology(top)
    promised = _dcd_header_frames(paths.dcd)
    try:
        with _silenced_c_stdout(), mdtraj.formats.DCDTrajectoryFile(str(paths.dcd)) as handle:
            xyz_angstrom, lengths, angles = handle.read()
    except Exception as err:
        raise InputError(f"could not read DCD {paths.dcd}: {err}") from err
    if promised and xyz_angstrom.shape[0] != promised:
        raise InputError(f"{paths.dcd} is truncated or damaged: its header promises {promised} frames, the file "
                         f"holds {xyz_angstrom.shape[0]}; copy or write it again")
    if xyz_angstrom.shape[1] != topology.n_atoms:
        raise InputError(f"atom count mismatch: {paths.dcd} has {xyz_angstrom.shape[1]} atoms per frame, the "
                         f"topology {top} has {topology.n_atoms}; use the topology the trajectory was written with")
    if xyz_angstrom.shape[0] == 0:
        raise InputError(f"{paths.dcd} holds no frames")
    traj = mdtraj.Trajectory(xyz_angstrom / 10.0, topology)
    if lengths is not None:
        traj.unitcell_lengths, traj.unitcell_angles = lengths / 10.0, angles
    return traj


def _dcd_header_frames(path: Path) -> int:
    """The frame count a DCD header promises (0 if the writer left it unset or the header is unreadable;
    the DCD reader then reports the problem)."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    for order in "<>":
        if len(head) == 12 and struct.unpack(order + "i", head[:4])[0] == 84 and head[4:8] == b"CORD":
            return max(struct.unpack(order + "i", head[8:12])[0], 0)
    return 0


def read_structure(path, what: str = "structure"):
    """One structure file (PDB or any format mdtraj reads) as an ``mdtraj.Trajectory``; :class:`InputError`
    names the file when it is missing or unreadable."""
    import mdtraj
    path = Path(os.fspath(path))
    _require_file(path, f"{what} file")
    try:
        return mdtraj.load(str(path))
    except Exception as err:  # mdtraj raises assorted errors for malformed files
        raise InputError(f"could not read {what} {path}: {err}") from err


@dataclass
class WeightedTrajectory:
    """Frames with importance weights, aligned frame by frame.

    Attributes:
        traj: ``mdtraj.Trajectory`` (nm).
        log_weights: (n_frames,) float64, any additive constant.
        reduced_energies: (n_frames,) float64 u = U/kT, or None when unknown (e.g. plain MD).
        extra: other sidecar arrays.
    """

    traj: object
    log_weights: np.ndarray
    reduced_energies: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def unweighted(cls, traj) -> "WeightedTrajectory":
        """Equal weights for an ordinary (e.g. MD) trajectory."""
        return cls(traj, np.zeros(traj.n_frames))

    @property
    def n_frames(self) -> int:
        return len(self.log_weights)

    @property
    def weights(self) -> np.ndarray:
        """Normalized weights (n_frames,), summing to one."""
        return normalized_weights(self.log_weights)

    @property
    def ess(self) -> float:
        """Kish effective sample size of the weights."""
        return kish_ess(self.log_weights)


def read_weighted_trajectory(path_dcd, top=None, weights=None) -> WeightedTrajectory:
    """Read a weighted trajectory written by :func:`write_weighted_trajectory`.

    Args:
        path_dcd: the ``.dcd``.
        top: topology (path, MolecularSystem or Topology); default the PDB beside the DCD.
        weights: the ``.weights.npz``; default the one beside the DCD.
    Raises:
        InputError: missing files, atom-count mismatch, weight arrays of the wrong length, NaN/inf weights.
    """
    paths = trajectory_paths(path_dcd)
    npz = paths.npz if weights is None else Path(os.fspath(weights))
    _require_file(npz, "weights file", " (write it with write_weighted_trajectory, or treat the DCD as "
                                       "unweighted)" if weights is None else "")
    traj = read_trajectory(paths.dcd, top)
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:
        raise InputError(f"could not read weights file {npz}: {err}") from err
    fingerprint = arrays.pop(DCD_FINGERPRINT, None)
    if fingerprint is not None and str(fingerprint) != _fingerprint(paths.dcd):
        raise InputError(f"{npz} belongs to another trajectory than {paths.dcd} (the DCD was replaced after the "
                         "weights were written); write the samples again, or remove the sidecar to read the "
                         "DCD as unweighted")
    for key in ("log_weights", "reduced_energies"):
        if key not in arrays:
            raise InputError(f"{npz}: field {key!r} is missing (found: {', '.join(arrays) or 'nothing'})")
    log_w = _checked_per_frame(arrays.pop("log_weights"), traj.n_frames, "log_weights", f"{npz} vs {paths.dcd}")
    energies = _checked_per_frame(arrays.pop("reduced_energies"), traj.n_frames, "reduced_energies",
                                  f"{npz} vs {paths.dcd}")
    arrays.pop("weights", None)  # recomputed from log_weights on demand
    with np.errstate(over="ignore"):
        span = np.ptp(log_w)
    if not np.isfinite(span):
        raise InputError(f"{npz}: log_weights span from {log_w.min():.3g} to {log_w.max():.3g}, a range float64 "
                         "cannot hold (the differences overflow); the weights are damaged")
    for key in ("kT", "temperature"):
        if key in arrays and not (arrays[key].shape == () and np.isfinite(arrays[key]) and arrays[key] > 0):
            raise InputError(f"{npz}: field {key!r} must be one positive finite number, got {arrays[key]!r}")
    return WeightedTrajectory(traj, log_w, energies, arrays)



@dataclass(frozen=True)
class ResampleResult:
    """Outcome of :func:`write_resampled_trajectory`: frame ``indices`` drawn, ``n_unique`` distinct frames."""

    indices: np.ndarray
    n_unique: int
    paths: TrajectoryPaths


def resample(log_weights, n: int, rng: np.random.Generator, method: str = "systematic") -> np.ndarray:
    """Draw ``n`` frame indices with probabilities proportional to the weights.

    Args:
        log_weights: (n_frames,) log weights, or a :class:`WeightedTrajectory`.
        n: number of indices to draw (>= 1).
        rng: ``numpy.random.Generator`` (no global RNG).
        method: ``"systematic"`` (one uniform offset; lower variance, keeps more unique frames) or
            ``"multinomial"`` (independent draws).
    Returns:
        (n,) int64 indices, sorted for systematic resampling.
    """
    if isinstance(log_weights, WeightedTrajectory):
        log_weights = log_weights.log_weights
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise InputError(f"number of resampled frames must be a positive integer, got {n!r}")
    probabilities = normalized_weights(log_weights)
    if method == "multinomial":
        return rng.choice(len(probabilities), size=n, p=probabilities).astype(np.int64)
    if method != "systematic":
        raise InputError(f"unknown resampling method {method!r}; use 'systematic' or 'multinomial'")
    positions = (rng.random() + np.arange(n)) / n
    cumulative = np.cumsum(probabilities)
    cumulative[-1] = 1.0
    return np.searchsorted(cumulative, positions, side="right").astype(np.int64)


def write_resampled_trajectory(path_dcd, weighted: WeightedTrajectory, n: int, rng: np.random.Generator, *,
                               method: str = "systematic", force: bool = False) -> ResampleResult:
    """Draw ``n`` frames by weight (:func:`resample`) and write them as an unweighted DCD + PDB."""
    indices = resample(weighted.log_weights, n, rng, method)
    paths = write_trajectory(path_dcd, weighted.traj.topology, weighted.traj.xyz[indices], force=force)
    return ResampleResult(indices, int(np.unique(indices).size), paths)

"""Training data of a run: made by parallel tempering or MD, or read from a DCD, then balanced over states.

With ``data.balance_states`` every default state (a backbone phi sign, the double well's x sign) gets at
least that share of the training weight, rare states first seeded with MD started inside them
(``data.seed_rare_states``); the importance weights of samples never see these training weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np

from .analysis.diagnostics import default_states
from .config import RunConfigError
from .energy import OpenMMEnergy
from .io import read_trajectory, read_weighted_trajectory, resample, trajectory_paths, write_trajectory, \
    write_weighted_trajectory
from .md import MDSettings, run_md
from .systems import MolecularSystem
from .tempering import TemperingSettings, run_tempering

__all__ = ["frame_states", "make_data", "reference_frames", "training_frames"]


def training_frames(mol: MolecularSystem, config: dict, folder: Path, progress: bool = True) -> tuple:
    """Training frames (n, n_atoms, 3) nm and their training log weights (n,) or None (equal weights): the
    configured DCD (weighted by its sidecar when it has one), or data made now and saved as data.dcd;
    with ``data.balance_states`` the weights are then balanced (:func:`_balance_states`)."""
    data = config["data"]
    if data["path"] is None:
        folder.mkdir(parents=True, exist_ok=True)
        frames, log_weights = make_data(mol, config, folder / "data.dcd", force=True, progress=progress)
    else:
        if trajectory_paths(data["path"]).npz.is_file():
            weighted = read_weighted_trajectory(data["path"])
            traj, log_weights = weighted.traj, weighted.log_weights
            print(f"training data {data['path']}: weighted by {trajectory_paths(data['path']).npz.name} (Kish "
                  f"ESS {weighted.ess:.0f} of {weighted.n_frames} frames)")
        else:
            traj, log_weights = read_trajectory(data["path"]), None
        if traj.n_atoms != mol.n_atoms:
            raise RunConfigError(f"data {data['path']}: {traj.n_atoms} atoms, but the system has {mol.n_atoms}")
        frames = traj.xyz.astype(np.float64)
    share, seeding = data["balance_states"], data["seed_rare_states"]
    if share:
        log_weights = np.zeros(len(frames)) if log_weights is None else log_weights
        states = frame_states(mol, frames)
        if seeding and seeding["n_copies"] and seeding["n_frames"]:
            frames, log_weights, states = _seed_rare_states(mol, config, frames, log_weights, states, share,
                                                            progress)
        log_weights = _balance_states(log_weights, states, float(share))
    return frames, log_weights


def frame_states(mol: MolecularSystem, frames: np.ndarray) -> dict:
    """The default states of frames (n, n_atoms, 3) nm: {label: boolean mask (n,)}."""
    return default_states(mdtraj.Trajectory(frames.astype(np.float32), mol.mdtraj_topology()), mol.cvs)


def _seed_rare_states(mol, config, frames, log_weights, states, share, progress):
    """Frames of plain Langevin MD at T started inside each rare state, replacing that state's frames.

    A state below ``share`` of the weight (phi > 0 of a peptide at 300 K) is seen in tempering data
    mostly through hot frames whose weights for T are tiny: a few frames carry it, and a flow fitted to
    them fits those frames. Copies started from the state's highest-weight frames and run at T give
    thousands of frames with the right local structure; they carry the state's estimated weight, split
    equally over those still in the state (a basin this rare at T is metastable: few leave it).
    Returns (frames, log weights, states) with the new frames appended and the state's old frames at
    weight zero. The importance weights of samples never see these weights.
    """
    from scipy.special import logsumexp
    settings = {**config["data"]["tempering"], **config["data"]["seed_rare_states"], "n_temperatures": 1,
                "equilibration_steps": 0}
    n_copies = settings.pop("n_copies")
    energy = None
    for label in list(states):
        mask = states[label]
        p = _state_share(log_weights, mask)
        if not mask.any() or p >= share:
            continue
        inside = np.flatnonzero(mask)
        seeds = frames[inside[np.argsort(log_weights[inside])[::-1][:n_copies]]]
        energy = energy or OpenMMEnergy(mol, platform=config["energy"]["platform"],
                                        threads=config["energy"]["threads"])
        new = run_tempering(mol, TemperingSettings(**{**settings, "n_ladders": n_copies}), energy=energy,
                            starts=seeds, progress=progress).frames()
        new_states = frame_states(mol, new)
        kept = new[new_states[label]]
        if len(kept) == 0:
            continue
        print(f"training data: state {label} ({100 * p:.2g}% of the weight) represented by {len(kept)} frames of MD "
              f"at {mol.temperature:g} K started in it")
        new_log_w = np.full(len(kept), logsumexp(log_weights[mask]) - np.log(len(kept)))
        log_weights = np.concatenate([np.where(mask, -np.inf, log_weights), new_log_w])
        frames = np.concatenate([frames, kept])
        states = {name: np.concatenate([m, new_states[name][new_states[label]]]) for name, m in states.items()}
    return frames, log_weights, states


def _state_share(log_weights: np.ndarray, mask: np.ndarray) -> float:
    """The share of the total weight the frames in ``mask`` hold (0 for an empty state)."""
    from scipy.special import logsumexp
    return float(np.exp(logsumexp(log_weights[mask]) - logsumexp(log_weights))) if mask.any() else 0.0


def _balance_states(log_weights: np.ndarray, states: dict, share: float) -> np.ndarray:
    """Training log weights in which every state holding frames has at least ``share`` of the total weight.

    The flow then proposes rare states (e.g. phi > 0 of a peptide at 300 K, 0.3% of the Boltzmann
    weight) often enough that each gets many samples; the importance weights of the samples are
    computed from the flow's own density, so they stay exact and undo the balancing.
    """
    log_w = np.array(log_weights, dtype=np.float64)
    for mask in states.values():
        if not mask.any() or mask.all():
            continue
        p = _state_share(log_w, mask)
        if p < share:
            log_w[mask] += np.log(share * (1 - p) / (p * (1 - share)))
    return log_w


def make_data(mol: MolecularSystem, config: dict, path_dcd, *, force: bool = False, progress: bool = True) -> tuple:
    """Make the data of ``config["data"]`` (method tempering or md) and write them to ``path_dcd``
    (+ PDB, and for tempering the weights sidecar); return (frames (n, n_atoms, 3) nm, log weights or None)."""
    data = config["data"]
    if data["method"] == "md":
        md = MDSettings(**data["md"])
        frames = run_md(mol, md, platform=config["energy"]["platform"],
                        threads=config["energy"]["threads"], progress=progress).reshape(-1, mol.n_atoms, 3)
        write_trajectory(path_dcd, mol, frames, force=force, frame_time=(md.timestep, md.steps_per_frame))
        return frames, None
    if data["method"] != "tempering":
        raise RunConfigError(f"data.method must be 'tempering' or 'md', got {data['method']!r}")
    energy = OpenMMEnergy(mol, platform=config["energy"]["platform"], threads=config["energy"]["threads"])
    result = run_tempering(mol, TemperingSettings(**data["tempering"]), energy=energy, progress=progress)
    frames, log_weights = result.frames(), result.log_weights()
    write_weighted_trajectory(path_dcd, mol, frames, log_weights, result.reduced_energies.reshape(-1),
                              force=force, extra=_tempering_extra(mol, result))
    return frames, log_weights


def _tempering_extra(mol: MolecularSystem, result) -> dict:
    """Sidecar fields of tempering frames: kT, CVs, temperatures, each frame's rung and the exchange rates."""
    return {"kT": mol.kT, "temperature": mol.temperature, "cvs_json": json.dumps(mol.cvs),
            "temperatures": result.temperatures,
            "temperature_index": result.temperature_index, "exchange_acceptance": result.acceptance}


def reference_frames(data: np.ndarray, log_weights: np.ndarray | None, limit: int) -> np.ndarray:
    """At most ``limit`` frames that represent the data: evenly strided, or drawn by weight."""
    if log_weights is not None:
        index = np.unique(resample(log_weights, min(limit, len(data)), np.random.default_rng(0)))
        return np.ascontiguousarray(data[index])
    stride = max(1, int(np.ceil(len(data) / limit)))
    return np.ascontiguousarray(data[::stride])

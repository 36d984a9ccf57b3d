"""The four-call Python API: ``load_system``, ``train``, ``sample``, ``free_energy`` (what the CLI does, no printing).

    import openmm.unit as unit
    import openmm_snf as snf
    run = snf.train("double_well", "dw_run", iterations=100)          # a run folder, as `openmm-snf train`
    samples = snf.sample(run, 2000, out="dw.dcd")                     # a WeightedTrajectory (+ files with out)
    result = snf.free_energy(samples, "A: x < 0", "B: x > 0")         # F_A - F_B in kT, bootstrap interval

Every function takes what the matching command takes; quantities may carry ``openmm.unit`` units.
"""
from __future__ import annotations

import json
import os

import mdtraj
import openmm.unit as unit

from .analysis import FreeEnergyResult, state_free_energy
from .config import resolve_config
from .io import WeightedTrajectory, read_trajectory, read_weighted_trajectory, trajectory_paths, \
    write_weighted_trajectory
from .runs import Run, build_run, load_run
from .sampling import ANNEAL_STEP_SIZE, ANNEAL_STEPS, DEFAULT_MAX_N, DEFAULT_PRECISION, draw
from .systems import load_system
from .units import in_unit

__all__ = ["load_system", "train", "sample", "free_energy"]


def train(system, out, *, data=None, config=None, iterations: int | None = None, seed: int | None = None,
          pdb=None, forcefield=None, implicit: str | None = None, temperature=None, resume: bool = False,
          progress: bool = True) -> Run:
    """Train an SNF on ``system`` in the run folder ``out`` (created; ``resume=True`` continues one).

    Args:
        system: what :func:`load_system` takes as ``source`` (shipped name, PDB, System XML, prmtop, folder).
        data: training frames, a DCD with its PDB beside it (default: MD made now, kept as ``out/data.dcd``).
        config: a YAML file or a dict of configuration sections (see :mod:`openmm_snf.config`), merged over the
            package defaults and the shipped system's ``train.yaml``.
        iterations, seed: override ``training.n_iterations`` / ``training.seed``.
        pdb, forcefield, implicit, temperature: as for :func:`load_system` (temperature in K or a Quantity).
        resume: continue the run in ``out`` up to ``iterations`` (its stored configuration and system are used).
    Returns:
        the :class:`~openmm_snf.runs.Run`, its model (``run.snf``) trained and in eval mode.
    """
    if resume:
        run, trainer = build_run(out, None, resume=True, progress=progress)
        if iterations is not None:
            trainer.config.n_iterations = iterations
    else:
        if isinstance(forcefield, (str, os.PathLike)):
            forcefield = [os.fspath(forcefield)]
        source = {"source": os.fspath(system), "pdb": None if pdb is None else os.fspath(pdb),
                  "forcefield": forcefield, "implicit": implicit,
                  "temperature": in_unit(temperature, unit.kelvin, "temperature")}
        overrides = dict(config) if isinstance(config, dict) else {}
        training = dict(overrides.get("training") or {})
        training.update({key: value for key, value in (("n_iterations", iterations), ("seed", seed))
                         if value is not None})
        overrides["training"] = training
        if data is not None:
            overrides["data"] = {**(overrides.get("data") or {}), "path": os.fspath(data)}
        user_file = None if config is None or isinstance(config, dict) else config
        run, trainer = build_run(out, resolve_config(source, user_file, overrides), progress=progress)
    trainer.train()
    run.snf.eval()
    return run


def sample(run, n: int | str, *, seed: int = 0, anneal: int | str = "auto", anneal_kernel: str = "mc",
           anneal_steps: int = ANNEAL_STEPS, anneal_step_size: float = ANNEAL_STEP_SIZE,
           precision: float = DEFAULT_PRECISION, max_n: int = DEFAULT_MAX_N, batch_size: int = 1024, out=None,
           force: bool = False, progress: bool = True) -> WeightedTrajectory:
    """Draw ``n`` weighted samples from a trained run (a :class:`Run` or its folder), as ``openmm-snf sample``.

    Args:
        n: a number of samples, or ``"auto"``: rounds until every default state's free energy has a 95%
            interval of about ``± precision`` kT, at most ``max_n`` samples
            (:func:`~openmm_snf.sampling.sample_to_precision`; :func:`~openmm_snf.sampling.draw`).
        anneal, anneal_kernel, anneal_steps, anneal_step_size: annealed importance sampling of a flow-only
            model (see ``openmm-snf sample --help``); weights stay exact. ``"auto"``: as
            :func:`~openmm_snf.sampling.choose_annealing` decides from a pilot of the flow alone.
        out: also write ``out`` (.dcd) with its PDB and weight sidecars.
    Returns:
        a :class:`~openmm_snf.io.WeightedTrajectory`: ``.traj`` (mdtraj, nm), ``.log_weights``, ``.weights``
        (normalized), ``.reduced_energies`` (u = U/kT), ``.ess``.
    """
    run = run if isinstance(run, Run) else load_run(run)
    drawn = draw(run, n, anneal=anneal, kernel=anneal_kernel, n_steps=anneal_steps, step_size=anneal_step_size,
                 precision=precision, max_n=max_n, seed=seed, batch_size=batch_size, progress=progress)
    run, result = drawn.run, drawn.samples
    extra = {"kT": run.mol.kT, "temperature": run.mol.temperature, "cvs_json": json.dumps(run.mol.cvs)}
    if out is not None:
        write_weighted_trajectory(out, run.mol, result["xyz"], result["log_weights"], result["reduced_energies"],
                                  force=force, extra=extra)
    return WeightedTrajectory(mdtraj.Trajectory(result["xyz"], run.mol.mdtraj_topology()), result["log_weights"],
                              result["reduced_energies"], extra)


def free_energy(samples, state_a: str, state_b: str, *, cvs: dict | None = None, reference=None,
                n_bootstrap: int = 1000, block_length="auto", seed: int = 0) -> FreeEnergyResult:
    """ΔF = F_A − F_B (kT; kJ/mol when kT is known) between two states, as ``openmm-snf free-energy``.

    Args:
        samples: a :class:`~openmm_snf.io.WeightedTrajectory` (from :func:`sample`) or a DCD path (its weight
            sidecar beside it; without one the frames count as unweighted MD).
        state_a, state_b: ``"A: phi > 0"``-style states; CVs by name (``phi``, ``psi[ALA2]``, the system's own).
        cvs: more named CV definitions, e.g. ``{"d": {"kind": "distance", "atoms": [0, 5]}}``.
        reference: an ``mdtraj.Trajectory`` for RMSD CVs.
        block_length: bootstrap block in frames, or ``"auto"`` (statistical inefficiency; 1 for independent samples).
    """
    if not isinstance(samples, WeightedTrajectory):
        samples = (read_weighted_trajectory(samples) if trajectory_paths(samples).npz.is_file()
                   else WeightedTrajectory.unweighted(read_trajectory(samples)))
    known = json.loads(str(samples.extra["cvs_json"])) if "cvs_json" in samples.extra else {}
    kT = float(samples.extra["kT"]) if "kT" in samples.extra else None
    return state_free_energy(samples.traj, samples.log_weights, state_a, state_b, cvs={**known, **(cvs or {})},
                             reference=reference, kT=kT, n_bootstrap=n_bootstrap, seed=seed,
                             block_length=block_length)

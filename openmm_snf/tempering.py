"""Parallel tempering through the batched energy bridge: training data that cross barriers.

Plain MD at the target temperature T0 stays in the state it starts in when barriers are high (the
double well's ~9 kT; the phi > 0 states of alanine peptides at 300 K), and a flow trained on such
data never proposes the states it missed. Here L independent ladders of K temperatures
T0 < T1 < ... < T(K-1) are integrated together, every copy of every ladder one row of one batch
evaluated by :class:`~openmm_snf.energy.OpenMMEnergy` (the compiled kernel on CPUs: no OpenMM
Context per copy, per-copy energies for free). Neighbouring temperatures of a ladder swap every
``steps_per_frame`` steps with the replica-exchange Metropolis rule

    accept with min(1, exp((beta_i - beta_j) (U_i - U_j))),

so hot copies carry the cold ones over barriers. The integrator is OpenMM's LangevinMiddle
splitting (V R O R) with a per-copy temperature.

Every saved frame of every temperature is kept, with its reduced energy u0 = U/kT0; :func:`mbar_log_weights`
turns the pooled frames into exact (asymptotically) importance weights for T0 with MBAR, so all
temperatures' frames count, each by what it says about T0.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import openmm
import openmm.unit as unit
import torch
from tqdm.auto import tqdm

from .energy import OpenMMEnergy
from .systems import MolecularSystem, kT_in_kj_per_mol

__all__ = ["TemperingSettings", "TemperingResult", "default_ladder", "mbar_log_weights", "run_tempering"]


@dataclass
class TemperingSettings:
    """Settings of a parallel-tempering run.

    n_frames: frames saved per copy; steps_per_frame: Langevin steps between frames (an exchange
    attempt follows each frame); n_ladders: independent ladders; max_temperature: kelvin of the
    hottest rung (None: 2.5 x the system's temperature, where barriers of 10 kT become 4 kT);
    n_temperatures: rungs per ladder (None: from the number of atoms, so that neighbouring rungs'
    energy distributions overlap, see :func:`default_ladder`); timestep in fs; friction in 1/ps;
    equilibration_steps: steps (with exchanges) before the first saved frame; seed: the noise;
    hydrogen_mass: amu given to every hydrogen, taken from the heavy atom it is bonded to (None: the
    System's masses). Masses change the dynamics, never the Boltzmann distribution of positions, so
    heavier hydrogens buy a longer time step for free.
    """

    n_frames: int = 500
    steps_per_frame: int = 50
    n_ladders: int = 16
    max_temperature: float | None = None
    n_temperatures: int | None = None
    timestep: float = 1.0
    friction: float = 1.0
    equilibration_steps: int = 1000
    seed: int = 0
    hydrogen_mass: float | None = None

    def validate(self) -> None:
        check_dynamics_settings(self, "tempering", ("n_frames", "steps_per_frame", "n_ladders"))
        if self.n_temperatures is not None and (not isinstance(self.n_temperatures, (int, np.integer))
                                                or self.n_temperatures < 1):
            raise ValueError(f"tempering n_temperatures must be a positive integer, got {self.n_temperatures!r}")
        if self.max_temperature is not None and not (isinstance(self.max_temperature, (int, float))
                                                     and math.isfinite(self.max_temperature)
                                                     and self.max_temperature > 0):
            raise ValueError(f"tempering max_temperature must be a positive number of kelvin, got "
                             f"{self.max_temperature!r}")


def check_dynamics_settings(settings, what: str, counts: tuple) -> None:
    """Raise ValueError naming ``what`` unless the ``counts`` fields of ``settings`` are positive integers, its
    equilibration_steps an integer >= 0, its timestep and friction positive numbers and its hydrogen_mass
    valid (the fields tempering and exchange umbrella runs share)."""
    for name in counts:
        value = getattr(settings, name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} {name} must be a positive integer, got {value!r}")
    if not isinstance(settings.equilibration_steps, (int, np.integer)) or settings.equilibration_steps < 0:
        raise ValueError(f"{what} equilibration_steps must be an integer >= 0, got {settings.equilibration_steps!r}")
    for name in ("timestep", "friction"):
        value = getattr(settings, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{what} {name} must be a positive number, got {value!r}")
    MolecularSystem.check_hydrogen_mass(settings.hydrogen_mass, f"{what} hydrogen_mass")


def default_ladder(temperature: float, max_temperature: float, n_atoms: int,
                   n_temperatures: int | None = None) -> np.ndarray:
    """Geometric temperatures from ``temperature`` to ``max_temperature`` (kelvin), (K,) float64.

    Near-harmonic energies of N = 3 n_atoms degrees of freedom fluctuate by sqrt(N/2) kT, so rungs
    whose log-temperature gap is about 1/sqrt(N/2) keep exchange rates of a few tens of percent;
    K is chosen that way unless given.
    """
    if max_temperature < temperature:
        raise ValueError(f"max_temperature {max_temperature} K is below the target temperature {temperature} K")
    if n_temperatures is None:
        gap = 1.0 / math.sqrt(1.5 * n_atoms)
        n_temperatures = 1 + math.ceil(math.log(max_temperature / temperature) / gap)
    if n_temperatures == 1 or max_temperature == temperature:
        return np.full(1, float(temperature))
    return float(temperature) * (max_temperature / temperature) ** (np.arange(n_temperatures) / (n_temperatures - 1))


@dataclass
class TemperingResult:
    """Frames of a tempering run, sorted by temperature.

    xyz: (L, K, n_frames, n_atoms, 3) nm, float64: ladder l's frames at rung k in time order (one
    Markov chain of that temperature, its copy changing at exchanges); reduced_energies: (L, K, n_frames)
    u0 = U/kT0; temperatures: (K,) kelvin; acceptance: (K-1,) exchange acceptance between rungs k, k+1.
    """

    xyz: np.ndarray
    reduced_energies: np.ndarray
    temperatures: np.ndarray
    acceptance: np.ndarray

    @property
    def temperature_index(self) -> np.ndarray:
        """Rung of every frame, in the order of :meth:`frames`: (L*K*n_frames,) int."""
        n_ladders, n_temps, n_frames = self.reduced_energies.shape
        return np.broadcast_to(np.arange(n_temps)[None, :, None], (n_ladders, n_temps, n_frames)).reshape(-1)

    def frames(self) -> np.ndarray:
        """All frames (L*K*n_frames, n_atoms, 3): ladder after ladder, rung after rung, in time order."""
        return self.xyz.reshape(-1, *self.xyz.shape[-2:])

    def log_weights(self) -> np.ndarray:
        """MBAR log importance weights of :meth:`frames` for the target (lowest) temperature."""
        return mbar_log_weights(self.reduced_energies.reshape(-1), self.temperature_index, self.temperatures)


def mbar_log_weights(reduced_energies: np.ndarray, temperature_index: np.ndarray,
                     temperatures: np.ndarray) -> np.ndarray:
    """Log weights (n,) float64 of frames drawn at ``temperatures[temperature_index]`` for temperatures[0].

    reduced_energies: u0 = U/kT0 of every frame. The rung k's reduced potential is u_k = (T0/Tk) u0;
    MBAR (pymbar) gives the rungs' free energies f_k, and frame n's weight for T0 is
    exp(-u0_n) / sum_k N_k exp(f_k - u_k,n), computed in log space. Normalized to log-sum-exp 0.
    """
    from scipy.special import logsumexp
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from pymbar import MBAR  # prints a JAX advertisement and a timeseries warning on import
    u0 = np.asarray(reduced_energies, dtype=np.float64)
    index = np.asarray(temperature_index)
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if not np.all(np.isfinite(u0)):
        raise ValueError("tempering frames with non-finite energies cannot be weighted")
    u_kn = (temperatures[0] / temperatures)[:, None] * u0[None, :]
    n_k = np.bincount(index, minlength=len(temperatures))
    if len(temperatures) == 1:
        log_w = np.zeros(len(u0))
    else:
        f_k = MBAR(u_kn, n_k, initialize="BAR").f_k
        log_w = -u0 - logsumexp(f_k[:, None] - u_kn, b=n_k[:, None], axis=0)
    return log_w - logsumexp(log_w)


def _minimized(mol: MolecularSystem) -> np.ndarray:
    """The system's positions after an energy minimization on the Reference platform (nm, float64)."""
    context = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(mol.positions * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    return np.asarray(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                      dtype=np.float64)


class _Ladders:
    """The state of all copies: positions, velocities, each copy's rung; one LangevinMiddle step at a time."""

    def __init__(self, mol, energy, settings, temperatures, rng, starts=None):
        self.energy, self.rng = energy, rng
        self.n_ladders, self.n_temps = settings.n_ladders, len(temperatures)
        n_copies = self.n_ladders * self.n_temps
        self.masses = mol.masses(settings.hydrogen_mass)
        self.kT0 = kT_in_kj_per_mol(temperatures[0])
        self.temperatures = temperatures
        self.rung = np.tile(np.arange(self.n_temps), self.n_ladders)  # copy -> rung (copies of ladder l: l*K ...)
        if starts is None:
            self.x = np.repeat(_minimized(mol)[None], n_copies, axis=0)
        else:
            starts = np.asarray(starts, dtype=np.float64)
            if starts.ndim != 3 or starts.shape[1:] != (mol.n_atoms, 3) or not np.all(np.isfinite(starts)):
                raise ValueError(f"tempering starts must be finite ({mol.n_atoms}, 3) structures, got {starts.shape}")
            self.x = starts[np.arange(n_copies) % len(starts)].copy()
        self.v = self._thermal_velocities(np.arange(n_copies))
        self.dt = settings.timestep / 1000.0  # ps
        self.friction_factor = math.exp(-settings.friction * self.dt)
        self.u0, self.forces = self._evaluate()
        self.attempts = np.zeros(self.n_temps - 1)
        self.accepted = np.zeros(self.n_temps - 1)
        self.n_exchange_rounds = 0

    def _kT(self, copies) -> np.ndarray:
        return kT_in_kj_per_mol(self.temperatures[self.rung[copies]])

    def _thermal_velocities(self, copies) -> np.ndarray:
        sigma = np.sqrt(self._kT(copies)[:, None] / self.masses[None, :])
        return sigma[:, :, None] * self.rng.standard_normal((len(copies), len(self.masses), 3))

    def _evaluate(self):
        u, f = self.energy.energy_and_forces(torch.from_numpy(self.x))
        u, f = u.numpy(), f.numpy() * self.kT0  # kJ/mol/nm
        bad = ~np.isfinite(u) | ~np.isfinite(f).all(axis=(1, 2))
        if bad.any():
            raise FloatingPointError(f"tempering blew up: {int(bad.sum())} copies reached non-finite energies or "
                                     "forces; use a smaller timestep")
        return u, f

    def step(self, n_steps: int) -> None:
        all_copies = np.arange(len(self.x))
        for _ in range(n_steps):
            self.v += self.dt * self.forces / self.masses[None, :, None]
            self.x += 0.5 * self.dt * self.v
            noise = self._thermal_velocities(all_copies)
            self.v = self.friction_factor * self.v + math.sqrt(1 - self.friction_factor ** 2) * noise
            self.x += 0.5 * self.dt * self.v
            self.u0, self.forces = self._evaluate()

    def exchange(self) -> None:
        """Attempt swaps of neighbouring rungs in every ladder (even pairs, then odd pairs, alternately)."""
        if self.n_temps == 1:
            return
        beta0_over_beta = self.temperatures / self.temperatures[0]  # u_k = u0 / (T_k/T0)
        holder = np.empty((self.n_ladders, self.n_temps), dtype=np.int64)  # ladder, rung -> copy
        copies = np.arange(len(self.x))
        holder[copies // self.n_temps, self.rung] = copies
        start = self.n_exchange_rounds % 2
        self.n_exchange_rounds += 1
        for k in range(start, self.n_temps - 1, 2):
            i, j = holder[:, k], holder[:, k + 1]
            # (beta_k - beta_k+1)(U_i - U_j) in reduced units of T0
            log_accept = (1 / beta0_over_beta[k] - 1 / beta0_over_beta[k + 1]) * (self.u0[i] - self.u0[j])
            accept = np.log(self.rng.random(self.n_ladders)) < log_accept
            self.attempts[k] += self.n_ladders
            self.accepted[k] += accept.sum()
            i, j = i[accept], j[accept]
            scale_i = np.sqrt(self.temperatures[k + 1] / self.temperatures[k])
            self.v[i] *= scale_i
            self.v[j] /= scale_i
            self.rung[i], self.rung[j] = k + 1, k


def run_tempering(mol: MolecularSystem, settings: TemperingSettings | None = None, *,
                  energy: OpenMMEnergy | None = None, starts: np.ndarray | None = None,
                  progress: bool = True) -> TemperingResult:
    """Run parallel tempering of ``mol`` at its temperature and return the frames of every rung.

    energy: the batched energy at mol's temperature (default: a new :class:`OpenMMEnergy` on the
    compiled CPU route). starts: (S, n_atoms, 3) nm start structures, copy c starting from
    ``starts[c % S]`` (default: the system's positions, energy-minimized). Raises FloatingPointError
    if the integration blows up.
    """
    settings = settings or TemperingSettings()
    settings.validate()
    t0 = float(mol.temperature)
    temperatures = default_ladder(t0, settings.max_temperature or 2.5 * t0, mol.n_atoms, settings.n_temperatures)
    energy = energy or OpenMMEnergy(mol)
    if abs(energy.temperature - t0) > 1e-9:
        raise ValueError(f"the energy's temperature {energy.temperature} K differs from the system's {t0} K")
    state = _Ladders(mol, energy, settings, temperatures, np.random.default_rng(settings.seed), starts)
    n_ladders, n_temps, n_frames = settings.n_ladders, len(temperatures), settings.n_frames
    xyz = np.empty((n_ladders, n_temps, n_frames, mol.n_atoms, 3))
    u0 = np.empty((n_ladders, n_temps, n_frames))
    ladder_of_copy = np.arange(n_ladders * n_temps) // n_temps
    total = settings.equilibration_steps + n_frames * settings.steps_per_frame
    with tqdm(total=total, desc=f"tempering {mol.name} ({n_ladders} x {n_temps} copies, "
              f"{temperatures[0]:.0f}-{temperatures[-1]:.0f} K)", unit="step",
              disable=None if progress else True) as bar:  # None: a bar only on a terminal
        done = 0
        while done < settings.equilibration_steps:
            n = min(settings.steps_per_frame, settings.equilibration_steps - done)
            state.step(n)
            state.exchange()
            done += n
            bar.update(n)
        for frame in range(n_frames):
            state.step(settings.steps_per_frame)
            xyz[ladder_of_copy, state.rung, frame] = state.x
            u0[ladder_of_copy, state.rung, frame] = state.u0
            state.exchange()
            bar.update(settings.steps_per_frame)
    acceptance = np.divide(state.accepted, state.attempts, out=np.zeros_like(state.accepted),
                           where=state.attempts > 0)
    return TemperingResult(xyz, u0, temperatures, acceptance)

"""Reference molecular dynamics: many independent replicas of one molecule in one OpenMM Context.

The replicas are the non-interacting copies of :func:`openmm_snf.energy.replicate.build_replicated_system`,
integrated together with ``LangevinMiddleIntegrator``; one Context step advances every replica, which is
far faster than one Context per replica for a small molecule (README, Benchmarks, "Energy bridge"). Each replica is moved
back to its grid cell after every frame (a rigid translation, exact for translation-invariant
systems), so replicas never come within the pair-force cutoff of each other however far they
diffuse. Systems with an external field (CustomExternalForce) are not translated: the field holds them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openmm
import openmm.unit as unit
from tqdm.auto import tqdm

from .energy.platforms import choose_platform, platform_properties
from .energy.replicate import build_replicated_system
from .systems import MolecularSystem, kT_in_kj_per_mol
from .units import in_unit

__all__ = ["MDSettings", "UmbrellaBias", "run_md"]

_BIAS_KINDS = ("dihedral", "position")


@dataclass
class MDSettings:
    """Settings of a reference MD run (defaults suit the shipped alanine dipeptide systems).

    n_frames: frames saved per replica; steps_per_frame: integration steps between saved frames;
    n_replicas: independent copies integrated in one Context; timestep in fs; friction in 1/ps;
    equilibration_steps: steps run before the first frame (after an energy minimization);
    temperature: kelvin (default: the system's); seed: seeds velocities and the Langevin noise;
    timestep, friction, temperature and starts may also be ``openmm.unit`` quantities
    (``2 * unit.femtoseconds``), stored as plain numbers in the units above;
    starts: optional list of start structures ((n_atoms, 3) nm each); replica r starts from
    ``starts[r % len(starts)]`` (e.g. one per well of a double well), default the system's positions;
    hydrogen_mass: amu given to every hydrogen, taken from its heavy atom (None: the System's masses;
    e.g. 3.0 with a 2-fs ``timestep``: the same distribution of positions at half the steps).
    """

    n_frames: int = 1000
    steps_per_frame: int = 250
    n_replicas: int = 1
    timestep: float = 1.0
    friction: float = 1.0
    equilibration_steps: int = 5000
    temperature: float | None = None
    seed: int = 0
    starts: list | None = None
    hydrogen_mass: float | None = None

    def __post_init__(self):
        self.timestep = in_unit(self.timestep, unit.femtosecond, "timestep")
        self.friction = in_unit(self.friction, unit.picosecond ** -1, "friction")
        self.temperature = in_unit(self.temperature, unit.kelvin, "temperature")
        if unit.is_quantity(self.starts):
            self.starts = in_unit(self.starts, unit.nanometer, "starts").tolist()

    def validate(self, n_atoms: int) -> None:
        for name in ("n_frames", "steps_per_frame", "n_replicas"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.equilibration_steps < 0:
            raise ValueError(f"equilibration_steps must be >= 0, got {self.equilibration_steps}")
        for name in ("timestep", "friction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be positive kelvin, got {self.temperature!r}")
        MolecularSystem.check_hydrogen_mass(self.hydrogen_mass)
        if self.starts is not None:
            starts = np.asarray(self.starts, dtype=np.float64)
            if starts.ndim != 3 or starts.shape[1:] != (n_atoms, 3) or not np.all(np.isfinite(starts)):
                raise ValueError(f"starts must be a list of finite ({n_atoms}, 3) nm structures, got shape "
                                 f"{starts.shape}")


@dataclass
class UmbrellaBias:
    """Harmonic umbrella windows on one CV, window r on replica r: u_r(x) = ½ k d(cv(x), c_r)² in kT.

    kind: "dihedral" (``atoms``: 4 indices; cv in radians, d the periodic difference wrapped to
    [-pi, pi)) or "position" (``atoms``: 1 index, coordinate ``axis`` 0/1/2 in nm; only for systems
    held by an external field, e.g. the double well, since other systems are recentred).
    centers: (n_replicas,) window centres c_r (radians or nm).
    force_constant: k in kT/rad² or kT/nm² (kT of the MD temperature), the same for every window.
    """

    kind: str
    atoms: tuple
    centers: tuple
    force_constant: float
    axis: int = 0

    def validate(self, n_atoms: int, n_replicas: int) -> None:
        if self.kind not in _BIAS_KINDS:
            raise ValueError(f"bias kind must be one of {_BIAS_KINDS}, got {self.kind!r}")
        wanted = 4 if self.kind == "dihedral" else 1
        atoms = list(self.atoms)
        if len(atoms) != wanted or not all(0 <= int(a) < n_atoms for a in atoms):
            raise ValueError(f"a {self.kind} bias needs {wanted} atom indices in [0, {n_atoms}), got {atoms}")
        centers = np.asarray(self.centers, dtype=np.float64)
        if centers.shape != (n_replicas,) or not np.all(np.isfinite(centers)):
            raise ValueError(f"bias centers: need one finite centre per replica ({n_replicas}), got shape "
                             f"{centers.shape}")
        if not (np.isfinite(self.force_constant) and self.force_constant > 0):
            raise ValueError(f"bias force_constant must be a positive number of kT per unit², got "
                             f"{self.force_constant!r}")
        if self.kind == "position" and self.axis not in (0, 1, 2):
            raise ValueError(f"bias axis must be 0, 1 or 2, got {self.axis!r}")

    def deviation(self, cv) -> np.ndarray:
        """d(cv, c_r) of CV values (n,) from every centre: (n_replicas, n) float64."""
        d = np.asarray(cv, dtype=np.float64)[None, :] - np.asarray(self.centers, dtype=np.float64)[:, None]
        return (d + np.pi) % (2 * np.pi) - np.pi if self.kind == "dihedral" else d

    def reduced_energies(self, cv) -> np.ndarray:
        """Bias energies in kT of CV values (n,) under every window: (n_replicas, n) float64."""
        return 0.5 * float(self.force_constant) * self.deviation(cv) ** 2

    def openmm_force(self, n_atoms: int, offsets: np.ndarray, kT: float) -> openmm.Force:
        """The force biasing replica r (particles r*n_atoms ...) of a replicated System; kT in kJ/mol."""
        k = float(self.force_constant) * kT
        if self.kind == "dihedral":
            force = openmm.CustomTorsionForce("0.5*k_umb*dth^2; dth = min(dd, 2*pi - dd); dd = abs(theta - th0_umb);"
                                              f" pi = {np.pi!r}")
            force.addPerTorsionParameter("k_umb")
            force.addPerTorsionParameter("th0_umb")
            for r, center in enumerate(self.centers):
                force.addTorsion(*(r * n_atoms + int(a) for a in self.atoms), [k, float(center)])
            return force
        coordinate = "xyz"[self.axis]
        force = openmm.CustomExternalForce(f"0.5*k_umb*({coordinate} - c0_umb)^2")
        force.addPerParticleParameter("k_umb")
        force.addPerParticleParameter("c0_umb")
        for r, center in enumerate(self.centers):
            force.addParticle(r * n_atoms + int(self.atoms[0]), [k, float(center) + float(offsets[r, self.axis])])
        return force


def _is_translation_invariant(system: openmm.System) -> bool:
    return not any(isinstance(f, openmm.CustomExternalForce) for f in system.getForces())


def run_md(mol: MolecularSystem, settings: MDSettings | None = None, *, platform: str | None = None,
           threads: int | None = None, progress: bool = True,
           bias: UmbrellaBias | tuple[UmbrellaBias, ...] | None = None) -> np.ndarray:
    """Run Langevin MD and return frames of shape (n_replicas, n_frames, n_atoms, 3), float64 nm.

    Frames of one replica are consecutive in time; replicas are independent (own velocities and
    noise). The start is the system's positions, energy-minimized, then ``equilibration_steps``.
    With ``bias``, replica r samples the biased distribution of umbrella window r (equilibration and
    minimization included), so start it near its centre (``settings.starts``) if the CV is slow. Several
    biases add up: windows on a grid over two dihedrals are two biases whose centres pair up per replica.
    """
    settings = settings or MDSettings()
    settings.validate(mol.n_atoms)
    n_rep, n_atoms = int(settings.n_replicas), mol.n_atoms
    temperature = settings.temperature or mol.temperature
    recenter = _is_translation_invariant(mol.system)
    system, offsets = build_replicated_system(mol.system, n_rep)
    if settings.hydrogen_mass is not None:
        for index, mass in enumerate(np.tile(mol.masses(settings.hydrogen_mass), n_rep)):
            system.setParticleMass(index, float(mass))
    for one in () if bias is None else (bias,) if isinstance(bias, UmbrellaBias) else tuple(bias):
        one.validate(n_atoms, n_rep)
        if one.kind == "position" and recenter:
            raise ValueError(f"a position bias needs a system held by an external field; {mol.name} is "
                             "translation invariant (its replicas are recentred): bias a dihedral instead")
        system.addForce(one.openmm_force(n_atoms, offsets, kT_in_kj_per_mol(temperature)))
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, settings.friction / unit.picosecond,
                                                 settings.timestep * unit.femtosecond)
    integrator.setRandomNumberSeed(settings.seed + 1)  # OpenMM treats 0 as "pick a random seed"
    choice = choose_platform(platform)  # None: the same automatic choice as the energies'
    platform_obj, properties = platform_properties(choice, threads=threads)
    context = openmm.Context(system, integrator, platform_obj, properties)
    starts = np.asarray(settings.starts if settings.starts is not None else [mol.positions], dtype=np.float64)
    start = (starts[np.arange(n_rep) % len(starts)] + offsets[:, None, :]).reshape(-1, 3)
    context.setPositions(start * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, settings.seed + 1)
    frames = np.empty((n_rep, int(settings.n_frames), n_atoms, 3))
    bar = tqdm(total=settings.equilibration_steps + settings.n_frames * settings.steps_per_frame,
               desc=f"MD {mol.name} ({n_rep} replicas, OpenMM {choice.name})", unit="step",
               disable=None if progress else True)  # None: a bar only on a terminal
    if settings.equilibration_steps:
        integrator.step(int(settings.equilibration_steps))
        bar.update(settings.equilibration_steps)
    for frame in range(int(settings.n_frames)):
        integrator.step(int(settings.steps_per_frame))
        bar.update(settings.steps_per_frame)
        xyz = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        xyz = np.asarray(xyz).reshape(n_rep, n_atoms, 3) - offsets[:, None, :]
        if not np.all(np.isfinite(xyz)):
            raise FloatingPointError(f"MD of {mol.name} blew up before frame {frame}: non-finite positions; "
                                     "use a smaller --timestep")
        if recenter:
            xyz = xyz - xyz.mean(axis=1, keepdims=True)
            context.setPositions(((xyz + offsets[:, None, :]).reshape(-1, 3)) * unit.nanometer)
        frames[:, frame] = xyz
    bar.close()
    return frames

"""Load a molecular system into one object: topology, OpenMM System, positions, temperature and kT.

Sources (all go through :func:`load_system`):

* a shipped name (``alanine_dipeptide_vacuum``, ``alanine_dipeptide_implicit``, ``double_well``),
  or a folder laid out like ``systems/<name>/`` (``metadata.yaml``, ``structure.pdb``, ``system.xml``);
* a PDB plus force-field XML names (``openmm.app.ForceField``), optionally with implicit solvent;
* a serialized System XML plus a PDB;
* an Amber ``.prmtop`` plus ``.inpcrd``.

Bad input raises :class:`SystemLoadError` with a message that names the file, the field and the fix.
Explicit solvent (water residues) and periodic Systems are refused: the package samples single
molecules in vacuum or implicit solvent. Constraints are reported, not removed:
:attr:`MolecularSystem.constrained_pairs` lists them, and the
steps that cannot handle them (the internal-coordinate flows) refuse them with a clear error.
"""
from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import yaml
from scipy.spatial import cKDTree

from .units import in_unit

__all__ = ["MolecularSystem", "SystemLoadError", "load_system", "shipped_systems", "SHIPPED_DIR",
           "kT_in_kj_per_mol", "as_mdtraj_topology"]



def _shipped_dir() -> Path:
    """The shipped systems: package data ``openmm_snf/shipped`` of an installed wheel (setup.py maps the
    repository's ``systems/`` folder there), else ``systems/`` beside the package in a source checkout."""
    installed = Path(str(importlib.resources.files("openmm_snf") / "shipped"))
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "systems"


SHIPPED_DIR = _shipped_dir()
MIN_ATOM_DISTANCE_NM = 0.05  # half the shortest bond (C-H, 0.1 nm): closer atoms overlap
WATER_RESIDUES = {"HOH", "WAT", "SOL", "TIP", "TIP3", "TIP4", "TIP5", "T3P", "T4P", "SPC", "H2O"}

IMPLICIT_MODELS = {"obc1": "implicit/obc1.xml", "obc2": "implicit/obc2.xml", "gbn": "implicit/gbn.xml",
                   "gbn2": "implicit/gbn2.xml", "hct": "implicit/hct.xml"}


class SystemLoadError(ValueError):
    """A system could not be loaded; the message says which file or field and how to fix it."""


def kT_in_kj_per_mol(temperature_kelvin: float) -> float:
    """k_B T in kJ/mol for a temperature in kelvin (the one place where the gas constant is used)."""
    return (unit.MOLAR_GAS_CONSTANT_R * temperature_kelvin * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)


@dataclass
class MolecularSystem:
    """Everything downstream needs to know about a molecule.

    Attributes:
        name: a short label (the shipped name or the file stem).
        topology: ``openmm.app.Topology``.
        system: ``openmm.System`` (the force field; never modified by the package).
        positions: (n_atoms, 3) float64 array in nm.
        temperature: temperature in kelvin.
        cvs: collective variables of interest, e.g. ``{"phi": {"kind": "dihedral", "atoms": [4, 6, 8, 14]}}``.
        states: two states whose free-energy difference characterizes the system, the rare one first, e.g.
            ``["A: phi > 0", "B: phi < 0"]`` (``openmm-snf demo`` reports it); empty if the source names none.
        description: free text.
        sources: the files the system was read from (commands refuse to overwrite them).
    """

    name: str
    topology: app.Topology
    system: openmm.System
    positions: np.ndarray
    temperature: float
    cvs: dict = field(default_factory=dict)
    description: str = ""
    sources: tuple = ()
    states: list = field(default_factory=list)

    @property
    def kT(self) -> float:
        """k_B T in kJ/mol."""
        return kT_in_kj_per_mol(self.temperature)

    @property
    def n_atoms(self) -> int:
        return self.system.getNumParticles()

    @property
    def constrained_pairs(self) -> list[tuple[int, int]]:
        return [tuple(self.system.getConstraintParameters(i)[:2]) for i in range(self.system.getNumConstraints())]

    @property
    def is_periodic(self) -> bool:
        return self.system.usesPeriodicBoundaryConditions()

    @staticmethod
    def check_hydrogen_mass(hydrogen_mass, what: str = "hydrogen_mass") -> None:
        """Raise ValueError unless ``hydrogen_mass`` (amu, for :meth:`masses`) is None or a number in (0, 6)."""
        if hydrogen_mass is not None and not (isinstance(hydrogen_mass, (int, float)) and 0 < hydrogen_mass < 6):
            raise ValueError(f"{what} must be between 0 and 6 amu, got {hydrogen_mass!r}")

    def masses(self, hydrogen_mass: float | None = None) -> np.ndarray:
        """Particle masses (n_atoms,) in amu; with ``hydrogen_mass``, every hydrogen gets that mass, taken from
        the heavy atom it is bonded to (hydrogen mass repartitioning: longer time steps, same Boltzmann
        distribution of positions)."""
        masses = np.array([self.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(self.n_atoms)])
        if hydrogen_mass is not None:
            for bond in self.topology.bonds():
                for h, heavy in ((bond[0], bond[1]), (bond[1], bond[0])):
                    if h.element is not None and h.element.symbol == "H" and (heavy.element is None or
                                                                              heavy.element.symbol != "H"):
                        masses[heavy.index] -= hydrogen_mass - masses[h.index]
                        masses[h.index] = hydrogen_mass
        if np.any(masses <= 0):
            raise ValueError(f"{self.name}: dynamics needs every particle to have a positive mass (got "
                             f"{masses.min():g} amu{'; lower hydrogen_mass' if hydrogen_mass else ''})")
        return masses

    def mdtraj_topology(self):
        import mdtraj
        return mdtraj.Topology.from_openmm(self.topology)

    def with_temperature(self, temperature: float) -> "MolecularSystem":
        """The same system at another temperature (kelvin or a Quantity; the System's forces are unchanged)."""
        temperature = in_unit(temperature, unit.kelvin, "temperature")
        _check_temperature(temperature, "temperature")
        return replace(self, temperature=float(temperature), cvs=dict(self.cvs), states=list(self.states))

    def write_pdb(self, path, positions=None) -> None:
        """Write the topology with ``positions`` (n_atoms, 3) nm or a Quantity (default: the system's) as a PDB."""
        pos = self.positions if positions is None else np.asarray(in_unit(positions, unit.nanometer, "positions"))
        with open(path, "w") as handle:
            app.PDBFile.writeFile(self.topology, pos * unit.nanometer, handle, keepIds=True)


def as_mdtraj_topology(topology):
    """An ``mdtraj.Topology`` from a MolecularSystem, an ``openmm.app.Topology`` or an ``mdtraj.Topology``."""
    import mdtraj
    if isinstance(topology, mdtraj.Topology):
        return topology
    if isinstance(topology, MolecularSystem):
        return topology.mdtraj_topology()
    if isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    raise TypeError(f"expected a MolecularSystem, openmm.app.Topology or mdtraj.Topology, got {type(topology)}")


def shipped_systems() -> list[str]:
    """Names of the systems shipped in ``systems/``."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "metadata.yaml").is_file())


def load_system(source, *, pdb=None, forcefield=None, implicit=None, temperature=None) -> MolecularSystem:
    """Load a system from a shipped name, a folder, a PDB (+ force field), a System XML (+ PDB) or a prmtop.

    Args:
        source: shipped name, folder with ``metadata.yaml``, ``*.pdb``, ``*.xml`` (serialized System) or
            ``*.prmtop``.
        pdb: structure for a System XML, or ``.inpcrd`` coordinates for a prmtop.
        forcefield: force-field XML name, or a list of them, for a PDB (default ``"amber14-all.xml"``).
        implicit: implicit-solvent model for a PDB or prmtop: one of obc1, obc2, gbn, gbn2, hct.
        temperature: kelvin, or an ``openmm.unit`` temperature; default the source's metadata, else 300 K.
    """
    temperature = in_unit(temperature, unit.kelvin, "temperature")
    if isinstance(forcefield, (str, os.PathLike)):  # one file name, not a sequence of characters
        forcefield = [os.fspath(forcefield)]
    if temperature is not None:
        _check_temperature(temperature, "--temperature")
    if implicit is not None and implicit.lower() not in IMPLICIT_MODELS:
        raise SystemLoadError(f"unknown implicit-solvent model {implicit!r}; choose one of "
                              f"{', '.join(IMPLICIT_MODELS)}")
    source_str = os.fspath(source)
    path = Path(source_str)
    if source_str in shipped_systems():
        path = SHIPPED_DIR / source_str
    if path.is_dir():
        return _load_folder(path, temperature)
    if not path.exists():
        raise SystemLoadError(
            f"{source_str!r} is neither a shipped system ({', '.join(shipped_systems())}) nor an existing file")
    suffix = path.suffix.lower()
    if suffix == ".pdb":
        if pdb is not None:
            raise SystemLoadError("a PDB source takes --forcefield, not a second structure (pdb=...)")
        return _from_pdb_and_forcefield(path, forcefield, implicit, temperature)
    if suffix == ".xml":
        if pdb is None:
            raise SystemLoadError(f"System XML {path} needs a structure: pass pdb=... (--pdb) for its topology")
        return _from_system_xml(path, Path(pdb), temperature)
    if suffix in (".prmtop", ".parm7"):
        if pdb is None:
            raise SystemLoadError(f"Amber topology {path} needs coordinates: pass the .inpcrd as pdb=... (--pdb)")
        return _from_prmtop(path, Path(pdb), implicit, temperature)
    raise SystemLoadError(f"{path}: unknown kind of file {suffix!r}; expected .pdb, .xml (System), .prmtop "
                          "or a folder with metadata.yaml")


def _check_temperature(temperature, what) -> None:
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise SystemLoadError(f"{what} must be a positive number of kelvin, got {temperature!r}")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise SystemLoadError(f"{what} not found: {path}")


def _read_pdb(path: Path) -> app.PDBFile:
    _require_file(path, "structure file")
    try:
        return app.PDBFile(str(path))
    except Exception as err:  # openmm raises bare Exceptions / ValueErrors for malformed files
        raise SystemLoadError(f"could not read PDB {path}: {err}") from err


def _positions_nm(quantity) -> np.ndarray:
    return np.asarray(quantity.value_in_unit(unit.nanometer), dtype=np.float64).reshape(-1, 3)


def _load_folder(folder: Path, temperature) -> MolecularSystem:
    meta_path = folder / "metadata.yaml"
    _require_file(meta_path, "metadata file")
    with open(meta_path) as handle:
        meta = yaml.safe_load(handle) or {}
    for key in ("structure", "system"):
        if key not in meta:
            raise SystemLoadError(f"{meta_path}: field {key!r} is missing (a file name inside {folder})")
    mol = _from_system_xml(folder / meta["system"], folder / meta["structure"],
                           temperature if temperature is not None else meta.get("temperature_kelvin"))
    mol.name = meta.get("name", folder.name)
    mol.sources = (meta_path,) + mol.sources
    mol.cvs = dict(meta.get("cvs") or {})
    mol.states = meta.get("states") or []
    if not (isinstance(mol.states, list) and len(mol.states) in (0, 2) and all(isinstance(t, str) for t in mol.states)):
        raise SystemLoadError(f"{meta_path}: 'states' must be a list of two states such as \"A: phi > 0\", got "
                              f"{mol.states!r}")
    mol.description = " ".join(str(meta.get("description", "")).split())
    return mol


def _from_system_xml(xml_path: Path, pdb_path: Path, temperature) -> MolecularSystem:
    _require_file(xml_path, "System XML")
    pdb = _read_pdb(pdb_path)
    try:
        with open(xml_path) as handle:
            system = openmm.XmlSerializer.deserialize(handle.read())
    except Exception as err:
        raise SystemLoadError(f"could not deserialize System XML {xml_path}: {err}") from err
    if not isinstance(system, openmm.System):
        raise SystemLoadError(f"{xml_path} holds a serialized {type(system).__name__}, not an openmm.System")
    return _finish(xml_path.stem if xml_path.stem != "system" else xml_path.parent.name,
                   pdb.topology, system, _positions_nm(pdb.positions), temperature, f"{xml_path} + {pdb_path}",
                   (xml_path, pdb_path))


def _from_pdb_and_forcefield(pdb_path: Path, forcefield, implicit, temperature) -> MolecularSystem:
    pdb = _read_pdb(pdb_path)
    _refuse_solvent(pdb.topology, str(pdb_path))
    files = list(forcefield) if forcefield else ["amber14-all.xml"]
    if implicit is not None:
        files.append(IMPLICIT_MODELS[implicit.lower()])
    try:
        ff = app.ForceField(*files)
    except Exception as err:
        raise SystemLoadError(f"could not load force field {files}: {err}") from err
    unmatched = ff.getUnmatchedResidues(pdb.topology)
    if unmatched:
        names = ", ".join(sorted({f"{r.name} (residue {r.id}, chain {r.chain.id})" for r in unmatched}))
        raise SystemLoadError(f"{pdb_path}: no template in {files} for residue(s) {names}; add a force-field XML "
                              "that defines them (--forcefield), or fix the residue names / missing atoms")
    try:
        system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                 rigidWater=False, removeCMMotion=False)
    except Exception as err:
        raise SystemLoadError(f"{pdb_path}: force field {files} could not build a System: {err}") from err
    return _finish(pdb_path.stem, pdb.topology, system, _positions_nm(pdb.positions), temperature, str(pdb_path),
                   (pdb_path,))


def _from_prmtop(prmtop_path: Path, inpcrd_path: Path, implicit, temperature) -> MolecularSystem:
    _require_file(prmtop_path, "Amber topology")
    _require_file(inpcrd_path, "Amber coordinates")
    try:
        prmtop = app.AmberPrmtopFile(str(prmtop_path))
        inpcrd = app.AmberInpcrdFile(str(inpcrd_path))
    except Exception as err:
        raise SystemLoadError(f"could not read Amber files {prmtop_path}, {inpcrd_path}: {err}") from err
    solvent = None if implicit is None else {"obc1": app.OBC1, "obc2": app.OBC2, "gbn": app.GBn, "gbn2": app.GBn2,
                                             "hct": app.HCT}[implicit.lower()]
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, constraints=None, implicitSolvent=solvent,
                                 removeCMMotion=False)
    return _finish(prmtop_path.stem, prmtop.topology, system, _positions_nm(inpcrd.positions), temperature,
                   f"{prmtop_path} + {inpcrd_path}", (prmtop_path, inpcrd_path))


def _refuse_solvent(topology, origin: str) -> None:
    waters = sum(1 for residue in topology.residues() if residue.name.upper() in WATER_RESIDUES)
    if waters:
        box = " in a periodic box" if topology.getPeriodicBoxVectors() is not None else ""
        raise SystemLoadError(f"{origin}: explicit solvent ({waters} water molecules{box}) is not supported: "
                              "openmm-snf samples single molecules in vacuum or implicit solvent; "
                              "remove the water and ions and use --implicit (e.g. obc2)")


def _finish(name, topology, system, positions, temperature, origin, sources) -> MolecularSystem:
    _refuse_solvent(topology, origin)
    if system.usesPeriodicBoundaryConditions():
        raise SystemLoadError(f"{origin}: the System is periodic (explicit solvent or a crystal); openmm-snf samples "
                              "single molecules in vacuum or implicit solvent: build the System with NoCutoff")
    n_top, n_sys = topology.getNumAtoms(), system.getNumParticles()
    if n_top != n_sys:
        raise SystemLoadError(f"{origin}: particle count mismatch: the structure has {n_top} atoms, the System "
                              f"{n_sys} particles; use the structure the System was built from")
    if positions.shape != (n_sys, 3):
        raise SystemLoadError(f"{origin}: {positions.shape[0]} positions for {n_sys} particles")
    if not np.all(np.isfinite(positions)):
        raise SystemLoadError(f"{origin}: the structure has non-finite coordinates")
    close = sorted(cKDTree(positions).query_pairs(MIN_ATOM_DISTANCE_NM))
    if close:
        more = f" (and {len(close) - 1} more pairs)" if len(close) > 1 else ""
        raise SystemLoadError(f"{origin}: atoms {close[0][0]} and {close[0][1]}{more} are closer than "
                              f"{MIN_ATOM_DISTANCE_NM} nm: overlapping atoms, which no simulation survives; fix the "
                              "structure's coordinates")
    if temperature is None:
        temperature = 300.0
    _check_temperature(temperature, "temperature")
    return MolecularSystem(name=name, topology=topology, system=system, positions=positions,
                           temperature=float(temperature), sources=tuple(Path(p) for p in sources))

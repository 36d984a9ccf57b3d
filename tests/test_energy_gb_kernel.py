"""The compiled GB kernel: energies and forces of every app GB model equal OpenMM's Reference platform.

Systems: alanine dipeptide and a zwitterionic Ala-Ser-Phe (charged NH3+ and COO- termini), amber14 with
implicit/{hct,obc1,obc2,gbn,gbn2}.xml, NoCutoff and CutoffNonPeriodic (0.6 nm: some pairs are cut),
one model with salt (kappa > 0) and without the ACE surface term, and the native GBSAOBCForce.
"""
import functools
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy
from openmm_snf.energy.gb import CustomGBTerm, GBSAOBCTerm
from openmm_snf.energy import kernels
from openmm_snf.energy.kernels import CompiledTerms
from openmm_snf.energy.terms import build_energy_terms
from openmm_snf.systems import MolecularSystem
from conftest import gbsaobc_and_cutoff

MODELS = ("hct", "obc1", "obc2", "gbn", "gbn2")
NAMES = {"hct": "HCT", "obc1": "OBC1", "obc2": "OBC2", "gbn": "GBn", "gbn2": "GBn2"}
TRIPEPTIDE = Path(__file__).parent / "data" / "ace_ser_phe_nme.pdb"  # Ace-Ala-Ser-Phe-Nme


@functools.lru_cache(maxsize=None)
def zwitterion():
    """(topology, positions nm) of Ala-Ser-Phe with charged termini, made from the capped test peptide:
    caps and the amide H removed, OXT placed in the carboxylate plane, hydrogens added by Modeller."""
    pdb = app.PDBFile(str(TRIPEPTIDE))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name in ("ACE", "NME")])
    modeller.delete([a for a in modeller.topology.atoms() if a.residue.index == 0 and a.name == "H"])
    topology = modeller.topology
    positions = np.array(modeller.positions.value_in_unit(unit.nanometer))
    atoms = {a.name: a for a in list(topology.residues())[-1].atoms()}
    c, o, ca = (positions[atoms[name].index] for name in ("C", "O", "CA"))
    bisector = (ca - c) / np.linalg.norm(ca - c) + (o - c) / np.linalg.norm(o - c)
    oxt = topology.addAtom("OXT", app.element.oxygen, atoms["C"].residue)
    topology.addBond(atoms["C"], oxt)
    positions = np.vstack([positions, c - 0.125 * bisector / np.linalg.norm(bisector)])
    modeller = app.Modeller(topology, unit.Quantity([openmm.Vec3(*p) for p in positions], unit.nanometer))
    # a named platform: OpenMM's default (the fastest) is OpenCL where a CPU runtime such as pocl is installed,
    # and pocl crashed in addHydrogens' minimization on this machine
    modeller.addHydrogens(app.ForceField("amber14-all.xml"), platform=openmm.Platform.getPlatformByName("Reference"))
    return modeller.topology, np.array(modeller.positions.value_in_unit(unit.nanometer))


def molecule(peptide):
    if peptide == "aldp":
        mol = load_system("alanine_dipeptide_vacuum")
        return mol.topology, mol.positions
    return zwitterion()


def gb_system(peptide, model, cutoff=None, **kwargs):
    topology, positions = molecule(peptide)
    forcefield = app.ForceField("amber14-all.xml", f"implicit/{model}.xml")
    method = app.NoCutoff if cutoff is None else app.CutoffNonPeriodic
    extra = {} if cutoff is None else {"nonbondedCutoff": cutoff * unit.nanometer}
    system = forcefield.createSystem(topology, nonbondedMethod=method, constraints=None, **extra, **kwargs)
    return MolecularSystem(f"{peptide}_{model}", topology, system, positions, 300.0)


def reference(system, xs, groups):
    """Energies (B,) and forces (B, n, 3) of the force groups ``groups`` on the Reference platform."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for x in xs:
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True, groups=groups)
        energies.append(state.getPotentialEnergy()._value)
        forces.append(state.getForces(asNumpy=True)._value)
    return np.array(energies), np.array(forces)


def samples(mol, n, scale=0.02, seed=0):
    rng = np.random.default_rng(seed)
    return mol.positions[None] + scale * rng.standard_normal((n, mol.n_atoms, 3))


def assert_matches_reference(mol, expected_model):
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(mol.system))
    for i, force in enumerate(system.getForces()):
        force.setForceGroup(i)
    terms, _ = build_energy_terms(system)
    gb = [(i, t) for i, t in terms if isinstance(t, (CustomGBTerm, GBSAOBCTerm))]
    x = samples(mol, 5)
    for claimed in (gb, terms):  # the GB force alone (its forces are small beside the bonds'), then all
        compiled = CompiledTerms(claimed)
        assert compiled.gb_model == expected_model and not compiled.rest
        energy, forces = compiled(x)
        ref_energy, ref_forces = reference(system, x, set(compiled.indices))
        assert np.all(np.abs(energy - ref_energy) <= 1e-6 + 1e-9 * np.abs(ref_energy))
        assert np.all(np.abs(forces - ref_forces) <= 1e-6 + 1e-9 * np.abs(ref_forces))


@pytest.mark.parametrize("cutoff", [None, 0.6], ids=["nocutoff", "cutoff"])
@pytest.mark.parametrize("peptide", ["aldp", "zwitterion"])
@pytest.mark.parametrize("model", MODELS)
def test_kernel_equals_reference_platform(model, peptide, cutoff):
    assert_matches_reference(gb_system(peptide, model, cutoff), NAMES[model])


def test_salt_and_no_surface_term_and_native_force():
    salty = gb_system("zwitterion", "obc2", 0.8, implicitSolventKappa=1.3 / unit.nanometer, sasaMethod=None)
    assert_matches_reference(salty, "OBC2")
    assert_matches_reference(gbsaobc_and_cutoff(), "GBSAOBCForce")


@pytest.mark.parametrize("make", [lambda: gb_system("aldp", "gbn2", 0.6), gbsaobc_and_cutoff], ids=["gbn2", "native"])
def test_close_contacts_take_every_branch_of_the_born_integral(make):
    """An H 0.004-0.03 nm from its carbon: the inner sphere (L = or), a neighbour's sphere ignored
    (step(r + sr - or) = 0) and, for the native force, atom i inside the neighbour's sphere."""
    mol = make()
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(mol.system))
    index, term = next((i, t) for i, t in build_energy_terms(system)[0] if isinstance(t, (CustomGBTerm, GBSAOBCTerm)))
    system.getForce(index).setForceGroup(31)
    rng = np.random.default_rng(3)
    x = np.repeat(mol.positions[None], 4, axis=0)
    for b, r in enumerate([0.004, 0.01, 0.02, 0.03]):
        direction = rng.standard_normal(3)
        x[b, 0] = x[b, 1] + r * direction / np.linalg.norm(direction)
    energy, forces = CompiledTerms([(index, term)])(x)
    ref_energy, ref_forces = reference(system, x, {31})
    assert np.all(np.abs(energy - ref_energy) <= 1e-6 + 1e-9 * np.abs(ref_energy))
    assert np.all(np.abs(forces - ref_forces) <= 1e-6 + 1e-9 * np.abs(ref_forces))


def test_shipped_implicit_system_is_compiled_and_self_checked():
    mol = load_system("alanine_dipeptide_implicit")
    model = OpenMMEnergy(mol, platform="Reference", forces_from="compiled")  # the self-check passes
    assert model.compiled.gb_model == "OBC1" and not model.compiled.rest
    assert "torch" not in model.describe()


def test_other_gb_forms_stay_on_the_torch_terms():
    mol = gb_system("aldp", "obc2")
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(mol.system))
    force = next(f for f in system.getForces() if isinstance(f, openmm.CustomGBForce))
    value, text, kind = force.getComputedValueParameters(1)
    force.setComputedValueParameters(1, value, text.replace("4.85", "4.9"), kind)  # not an app model any more
    terms, _ = build_energy_terms(system)
    compiled = CompiledTerms(terms)
    assert compiled.gb_model is None and [type(t).__name__ for _, t in compiled.rest] == ["CustomGBTerm"]


def test_large_molecules_leave_gb_to_the_torch_terms(monkeypatch):
    monkeypatch.setattr(kernels, "GB_MAX_ATOMS", 21)  # ALDP has 22 atoms
    terms, _ = build_energy_terms(load_system("alanine_dipeptide_implicit").system)
    compiled = CompiledTerms(terms)
    assert compiled.gb_model is None and [type(t).__name__ for _, t in compiled.rest] == ["CustomGBTerm"]


def test_results_do_not_depend_on_the_batch_or_thread_count():
    mol = gb_system("zwitterion", "gbn2", 0.6)
    terms, _ = build_energy_terms(mol.system)
    x = samples(mol, 70)
    one = CompiledTerms(terms, threads=1)(x)
    two = CompiledTerms(terms, threads=2)(x)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    alone = CompiledTerms(terms)(x[40:41])
    assert np.array_equal(alone[0], one[0][40:41]) and np.array_equal(alone[1], one[1][40:41])


def test_overlapping_atoms_flag_their_sample_only():
    mol = gb_system("aldp", "obc1")
    x = samples(mol, 40)
    x[7, 0] = x[7, 1]  # a bonded pair (H on its C) on top of each other: GB sees it, LJ does not
    terms, _ = build_energy_terms(mol.system)
    gb = [(i, t) for i, t in terms if isinstance(t, CustomGBTerm)]
    energy, forces = CompiledTerms(gb)(x)
    assert not np.isfinite(energy[7]) and not np.isfinite(forces[7]).all()
    rest = np.delete(np.arange(40), 7)
    clean = CompiledTerms(gb)(x[rest])
    assert np.array_equal(energy[rest], clean[0]) and np.array_equal(forces[rest], clean[1])
    model = OpenMMEnergy(mol, platform="Reference", forces_from="compiled")
    u, f = model.energy_and_forces(torch.as_tensor(x))
    assert model.last_flags[7] != 0 and torch.all(model.last_flags[rest] == 0)
    assert torch.isfinite(u[rest]).all() and torch.isfinite(f[rest]).all()

"""Shipped systems load and match their sources; bad input gets clear errors."""
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

from openmm_snf.systems import SHIPPED_DIR, SystemLoadError, kT_in_kj_per_mol, load_system, shipped_systems


def reference_energy(system, positions_nm):
    context = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_nm * unit.nanometer)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_shipped_names():
    assert shipped_systems() == ["alanine_dipeptide_implicit", "alanine_dipeptide_vacuum", "double_well",
                                 "trialanine_implicit"]


@pytest.mark.parametrize("name,factory,temperature", [
    ("alanine_dipeptide_vacuum", "AlanineDipeptideVacuum", 1000.0),
    ("alanine_dipeptide_implicit", "AlanineDipeptideImplicit", 300.0),
])
def test_aldp_matches_openmmtools(name, factory, temperature):
    from openmmtools import testsystems
    mol = load_system(name)
    source = getattr(testsystems, factory)(constraints=None)
    assert mol.n_atoms == source.system.getNumParticles() == 22
    assert mol.temperature == temperature
    assert mol.kT == pytest.approx(0.00831446261815324 * temperature, rel=1e-12)
    assert mol.constrained_pairs == []
    assert [a.name for a in mol.topology.atoms()] == [a.name for a in source.topology.atoms()]
    # openmmtools' own coordinates agree with the shipped PDB to its precision (1e-4 nm)
    np.testing.assert_allclose(mol.positions, source.positions.value_in_unit(unit.nanometer), atol=6e-5)
    ours, theirs = reference_energy(mol.system, mol.positions), reference_energy(source.system, mol.positions)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert mol.cvs["phi"]["atoms"] == [4, 6, 8, 14] and mol.cvs["psi"]["atoms"] == [6, 8, 14, 16]


def test_double_well_is_the_analytic_formula():
    mol = load_system("double_well")
    assert mol.n_atoms == 1
    rng = np.random.default_rng(0)
    for point in rng.uniform(-3, 3, size=(10, 3)):
        x, y, z = point
        u = x**4 - 6 * x**2 - 0.5 * x + 0.5 * y**2 + 0.5 * z**2
        assert reference_energy(mol.system, point[None]) / mol.kT == pytest.approx(u, rel=1e-9, abs=1e-9)


def test_temperature_override_keeps_forces():
    mol = load_system("alanine_dipeptide_vacuum", temperature=600.0)
    assert mol.temperature == 600.0 and mol.kT == pytest.approx(kT_in_kj_per_mol(600.0))
    assert mol.with_temperature(300.0).system is mol.system


def test_pdb_with_forcefield_and_implicit(tmp_path):
    pdb = SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb"
    mol = load_system(pdb, forcefield=["amber14-all.xml"], implicit="obc2", temperature=310)
    names = {type(f).__name__ for f in mol.system.getForces()}
    assert mol.n_atoms == 22 and mol.temperature == 310.0
    assert "NonbondedForce" in names and ("GBSAOBCForce" in names or "CustomGBForce" in names)


def test_system_xml_plus_pdb(tmp_path):
    folder = SHIPPED_DIR / "alanine_dipeptide_vacuum"
    mol = load_system(folder / "system.xml", pdb=folder / "structure.pdb", temperature=1000.0)
    assert mol.n_atoms == 22


def test_prmtop(tmp_path):
    from openmmtools import testsystems
    import os
    source = testsystems.AlanineDipeptideVacuum(constraints=None)
    prmtop = testsystems.get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.prmtop")
    inpcrd = testsystems.get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.crd")
    assert os.path.exists(prmtop)
    mol = load_system(prmtop, pdb=inpcrd, temperature=300.0)
    assert mol.n_atoms == 22
    assert reference_energy(mol.system, mol.positions) == pytest.approx(
        reference_energy(source.system, mol.positions), rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(source="no_such_system"), "neither a shipped system"),
    (dict(source="missing.pdb"), "neither a shipped system"),
    (dict(source=SHIPPED_DIR / "double_well" / "system.xml"), "needs a structure"),
    (dict(source=SHIPPED_DIR / "double_well" / "metadata.yaml"), "unknown kind of file"),
    (dict(source="double_well", temperature=-5.0), "positive number of kelvin"),
    (dict(source=SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb", implicit="tip3p"),
     "unknown implicit-solvent model"),
])
def test_bad_input_messages(kwargs, message):
    with pytest.raises(SystemLoadError, match=message):
        load_system(**kwargs)


def test_particle_count_mismatch():
    with pytest.raises(SystemLoadError, match="particle count mismatch: the structure has 1 atoms, the System 22"):
        load_system(SHIPPED_DIR / "alanine_dipeptide_vacuum" / "system.xml",
                    pdb=SHIPPED_DIR / "double_well" / "structure.pdb")


def test_residue_without_template(tmp_path):
    text = (SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb").read_text().replace("ALA", "XYZ")
    pdb = tmp_path / "odd.pdb"
    pdb.write_text(text)
    with pytest.raises(SystemLoadError, match=r"no template .* for residue\(s\) XYZ"):
        load_system(pdb)


def test_missing_structure_named(tmp_path):
    with pytest.raises(SystemLoadError, match="structure file not found: .*nothere.pdb"):
        load_system(SHIPPED_DIR / "double_well" / "system.xml", pdb=tmp_path / "nothere.pdb")


def test_constraints_and_periodicity_are_reported(tmp_path):
    pdb = app.PDBFile(str(SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb"))
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, constraints=app.HBonds)
    xml = tmp_path / "hbonds.xml"
    xml.write_text(openmm.XmlSerializer.serialize(system))
    mol = load_system(xml, pdb=SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb")
    assert len(mol.constrained_pairs) == 12 and not mol.is_periodic


def test_periodic_systems_are_refused(tmp_path):
    """A periodic System (explicit solvent, a crystal) is refused when loaded, not simulated as a droplet."""
    pdb = app.PDBFile(str(SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb"))
    topology = pdb.topology
    topology.setPeriodicBoxVectors(np.eye(3) * 3.0 * unit.nanometer)
    system = app.ForceField("amber14-all.xml").createSystem(topology, nonbondedMethod=app.PME, constraints=None)
    xml = tmp_path / "periodic.xml"
    xml.write_text(openmm.XmlSerializer.serialize(system))
    with pytest.raises(SystemLoadError, match="the System is periodic"):
        load_system(xml, pdb=SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb")


def test_shipped_systems_name_two_states_over_their_own_cvs():
    from openmm_snf.analysis import parse_state
    for name in shipped_systems():
        mol = load_system(name)
        states = [parse_state(text) for text in mol.states]
        assert [state.label for state in states] == ["A", "B"], name
        assert all(set(state.cv_names) <= set(mol.cvs) for state in states), name
        assert mol.with_temperature(500.0).states == mol.states


def test_states_of_a_system_folder_must_be_two_strings(tmp_path):
    import shutil
    folder = tmp_path / "dw"
    shutil.copytree(SHIPPED_DIR / "double_well", folder)
    meta = folder / "metadata.yaml"
    meta.write_text(meta.read_text().replace('states: ["A: x < 0", "B: x > 0"]', 'states: "A: x < 0"'))
    with pytest.raises(SystemLoadError, match="'states' must be a list of two states"):
        load_system(folder)

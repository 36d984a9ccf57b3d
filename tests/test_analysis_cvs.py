"""Collective variables by name, metadata and spec; the state parser."""
import math

import mdtraj
import numpy as np
import pytest

from openmm_snf.analysis import (CVError, StateError, compute_cv, compute_cvs, known_cv_names,
                                 parse_cv_definition, parse_cv_spec, parse_state)
from openmm_snf.systems import load_system


@pytest.fixture(scope="module")
def aldp():
    return load_system("alanine_dipeptide_vacuum")


@pytest.fixture(scope="module")
def traj(aldp):
    rng = np.random.default_rng(0)
    xyz = aldp.positions[None] + 0.03 * rng.standard_normal((20, aldp.n_atoms, 3))
    return mdtraj.Trajectory(xyz, aldp.mdtraj_topology())


def _dihedral(p):
    """Reference IUPAC dihedral of four points (numpy), in (-pi, pi]."""
    b0, b1, b2 = p[0] - p[1], p[2] - p[1], p[3] - p[2]
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return math.atan2(np.dot(np.cross(b1, v), w), np.dot(v, w))


def _kabsch_rmsd(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    u, singular, vt = np.linalg.svd(x.T @ y)
    singular[-1] *= np.sign(np.linalg.det(u @ vt))
    return math.sqrt(max((np.sum(x ** 2) + np.sum(y ** 2) - 2 * singular.sum()) / len(x), 0.0))


def test_metadata_phi_psi_match_mdtraj_and_numpy(aldp, traj):
    values = compute_cvs(traj, ["phi", "psi"], cvs=aldp.cvs)
    np.testing.assert_allclose(values["phi"], mdtraj.compute_phi(traj)[1][:, 0], atol=1e-6)
    np.testing.assert_allclose(values["psi"], mdtraj.compute_psi(traj)[1][:, 0], atol=1e-6)
    expected = [_dihedral(frame[[4, 6, 8, 14]].astype(np.float64)) for frame in traj.xyz]
    np.testing.assert_allclose(values["phi"], expected, atol=1e-5)
    # without metadata the same torsions come from the topology
    np.testing.assert_allclose(compute_cv(traj, "phi"), values["phi"])
    np.testing.assert_allclose(compute_cv(traj, "dihedral:6,8,14,16"), values["psi"])


def test_angle_distance_position_specs(traj):
    xyz = traj.xyz.astype(np.float64)
    np.testing.assert_allclose(compute_cv(traj, "distance:0,5"), np.linalg.norm(xyz[:, 0] - xyz[:, 5], axis=1),
                               rtol=1e-5)
    a, b = xyz[:, 4] - xyz[:, 6], xyz[:, 8] - xyz[:, 6]
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(compute_cv(traj, "angle:4,6,8"), np.arccos(cosine), atol=1e-5)
    np.testing.assert_allclose(compute_cv(traj, "position:3,z"), xyz[:, 3, 2])


def test_double_well_position_cv():
    mol = load_system("double_well")
    xyz = np.random.default_rng(1).standard_normal((6, 1, 3))
    traj = mdtraj.Trajectory(xyz, mol.mdtraj_topology())
    np.testing.assert_allclose(compute_cv(traj, "x", cvs=mol.cvs), xyz[:, 0, 0], rtol=1e-6)


def test_rmsd_to_reference(aldp, traj):
    reference = mdtraj.Trajectory(aldp.positions[None], aldp.mdtraj_topology())
    rmsd = compute_cv(traj, "rmsd", reference=reference)
    assert rmsd.shape == (20,) and np.all(rmsd > 0) and np.all(rmsd < 0.06)
    expected = [_kabsch_rmsd(frame, reference.xyz[0]) for frame in traj.xyz.astype(np.float64)]
    np.testing.assert_allclose(rmsd, expected, atol=2e-4)  # mdtraj works in float32
    rotation = np.linalg.qr(np.random.default_rng(2).standard_normal((3, 3)))[0]
    moved = mdtraj.Trajectory(reference.xyz @ rotation.T + 1.5, reference.topology)
    assert compute_cv(moved, "rmsd", reference=reference)[0] == pytest.approx(0.0, abs=5e-4)
    heavy = compute_cv(traj, "rmsd:element != H", reference=reference)
    assert not np.allclose(heavy, rmsd)
    with pytest.raises(CVError, match="needs a reference structure"):
        compute_cv(traj, "rmsd")
    with pytest.raises(CVError, match="matches no atoms"):
        compute_cv(traj, "rmsd:name XYZ", reference=reference)


def test_unknown_name_lists_known_ones(aldp, traj):
    assert known_cv_names(traj, aldp.cvs) == ["phi", "psi"]
    with pytest.raises(CVError, match=r"unknown collective variable 'theta'; known: phi, psi; or give a spec"):
        compute_cv(traj, "theta", cvs=aldp.cvs)
    with pytest.raises(CVError, match=r"defines no omega torsion"):
        compute_cv(traj, "omega")


@pytest.mark.parametrize("spec, message", [
    ("dihedral:1,2,3", r"a dihedral needs 4 comma-separated atom indices"),
    ("torsion:1,2,3,4", r"unknown kind 'torsion'"),
    ("position:0,w", r"position:ATOM,AXIS"),
    ("distance:0,99", r"atom index 99 out of range for a topology of 22 atoms"),
])
def test_bad_specs(traj, spec, message):
    with pytest.raises(CVError, match=message):
        compute_cv(traj, spec)


def test_cv_definitions():
    assert parse_cv_definition("d = distance:0,5") == ("d", {"kind": "distance", "atoms": [0, 5]})
    assert parse_cv_spec("position:0,y") == {"kind": "position", "atom": 0, "axis": 1}
    with pytest.raises(CVError, match="expected NAME=SPEC"):
        parse_cv_definition("distance:0,5")


def test_several_residues_need_a_residue_or_an_index():
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    atoms = []
    for name in ("ALA", "ALA", "ALA"):
        residue = topology.add_residue(name, chain)
        atoms += [topology.add_atom(a, mdtraj.element.get_by_symbol(a[0]), residue) for a in ("N", "CA", "C")]
    for a, b in zip(atoms, atoms[1:]):
        topology.add_bond(a, b)
    traj = mdtraj.Trajectory(np.random.default_rng(0).standard_normal((3, 9, 3)), topology)
    with pytest.raises(CVError, match=r"ambiguous: the topology has 2 phi torsions; name the residue "
                                      r"\(phi\[ALA1\], phi\[ALA2\]\) or the index phi\[0\] .. phi\[1\]"):
        compute_cv(traj, "phi")
    np.testing.assert_allclose(compute_cv(traj, "phi[1]"), compute_cv(traj, "dihedral:5,6,7,8"), atol=1e-6)
    np.testing.assert_allclose(compute_cv(traj, "phi[ala2]"), compute_cv(traj, "phi[1]"))
    np.testing.assert_allclose(compute_cv(traj, "psi[ALA0]"), compute_cv(traj, "dihedral:0,1,2,3"), atol=1e-6)
    assert "psi[ALA1]" in known_cv_names(traj)
    with pytest.raises(CVError, match=r"no phi torsion in residue ALA0; residues with one: ALA1, ALA2"):
        compute_cv(traj, "phi[ALA0]")


def test_states_select_the_right_frames():
    phi = np.array([-2.5, -1.0, -0.5, 0.5, 2.0])
    psi = np.array([2.0, 1.5, 0.5, 2.0, -1.0])
    values = {"phi": phi, "psi": psi}
    cases = {
        "A: phi < 0": phi < 0,
        "B: phi > 0": phi > 0,
        "C: -2 < phi < 0 and psi > 1": (phi > -2) & (phi < 0) & (psi > 1),
        "D: phi <= -0.5 or not (psi >= -pi and psi < 1)": (phi <= -0.5) | ~((psi >= -math.pi) & (psi < 1)),
        "E: -100deg < phi < 30 deg": (phi > math.radians(-100)) & (phi < math.radians(30)),
        "phi > 1e-1": phi > 0.1,
        "F: 0 > phi > -1.5 and psi > 1 or phi > 1.5": ((phi < 0) & (phi > -1.5) & (psi > 1)) | (phi > 1.5),
    }
    for text, expected in cases.items():
        np.testing.assert_array_equal(parse_state(text).mask(values), expected, err_msg=text)
    state = parse_state("C: -2 < phi < 0 and psi > 1")
    assert (state.label, state.expression, state.cv_names) == ("C", "-2 < phi < 0 and psi > 1", ("phi", "psi"))
    assert parse_state("phi > 0").label == "phi > 0"


@pytest.mark.parametrize("text, message", [
    ("A: phi <", r"expected a number or a CV name, found the end"),
    ("A: phi", r"expected a comparison"),
    ("A: phi = 0", r"unexpected character '='"),
    ("A: (phi < 0", r"expected '\)'"),
    ("A: phi < 0 psi > 1", r"expected 'and', 'or' or the end, found 'psi'"),
    ("A: 1 < 2", r"uses no collective variable"),
    ("A:", r"the predicate after the label is empty"),
    ("", r"empty state definition"),
    ("A: __import__('os') < 1", r"unexpected character"),
])
def test_bad_states(text, message):
    with pytest.raises(StateError, match=message):
        parse_state(text)


def test_state_mask_needs_its_cvs():
    with pytest.raises(StateError, match=r"no values for CV\(s\) psi"):
        parse_state("A: psi < 0").mask({"phi": np.zeros(3)})

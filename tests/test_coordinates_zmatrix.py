"""Z-matrices from topologies (alanine dipeptide, a capped tripeptide with a ring, fragments, a non-peptide),
user z-matrices, and the transform on molecules other than alanine dipeptide."""
from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_snf.coordinates import InternalCoordinateTransform, ZMatrix, ZMatrixError
from openmm_snf.coordinates.graph import MolecularGraph
from openmm_snf.coordinates.rings import ring_blocks
from openmm_snf.coordinates.transform import stages
from openmm_snf.systems import load_system
from test_coordinates_transform import full_map, slogdet

TRIPEPTIDE = Path(__file__).parent / "data" / "ace_ser_phe_nme.pdb"  # Ace-Ala-Ser-Phe-Nme, PDBFixer + minimized
PAPER_ROWS = [[0, 1, 4, 6], [1, 4, 6, 8], [2, 1, 4, 0], [3, 1, 4, 0], [4, 6, 8, 14], [5, 4, 6, 8], [7, 6, 8, 4],
              [11, 10, 8, 6], [12, 10, 8, 11], [13, 10, 8, 11], [15, 14, 8, 16], [16, 14, 8, 6],
              [17, 16, 14, 15], [18, 16, 14, 8], [19, 18, 16, 14], [20, 18, 16, 19], [21, 18, 16, 19]]


def bonded_pairs(topology):
    return {frozenset((b[0].index, b[1].index)) for b in topology.bonds()}


def perturbed(positions, n_frames, scale=0.004, seed=0):
    rng = np.random.default_rng(seed)
    return positions[None] + scale * rng.standard_normal((n_frames,) + positions.shape)


def round_trip_error(transform, frames):
    x = torch.tensor(frames)
    ic, logdet = transform.inverse(x)
    back, logdet_back = transform.forward(ic)
    ic_again, _ = transform.inverse(back)
    exact = "donot_use_mm_for_euclid_dist"
    dist = torch.cdist(back, back, compute_mode=exact) - torch.cdist(x, x, compute_mode=exact)  # rigid-invariant
    return dist.abs().max().item(), (ic_again - ic).abs().max().item(), (logdet + logdet_back).abs().max().item()


def test_alanine_dipeptide_zmatrix():
    mol = load_system("alanine_dipeptide_vacuum")
    zmatrix = ZMatrix.from_topology(mol.topology)
    assert np.array_equal(zmatrix.rows, ZMatrix.from_topology(mol.mdtraj_topology()).rows)  # both topology kinds
    assert np.array_equal(zmatrix.rows, ZMatrix.from_topology(mol.topology).rows)           # deterministic
    assert zmatrix.rigid.tolist() == [6, 8, 9, 10, 14] and zmatrix.supports_mixed and zmatrix.supports_global
    mixed_rows = zmatrix.rows_for("mixed")
    assert len(mixed_rows) == 17 and sorted(mixed_rows[:, 0]) == sorted(set(range(22)) - {6, 8, 9, 10, 14})
    assert [4, 6, 8, 14] in mixed_rows.tolist() and [16, 14, 8, 6] in mixed_rows.tolist()   # phi, psi
    bonds = bonded_pairs(mol.topology)
    for a, b, c, _ in zmatrix.rows[1:]:
        assert frozenset((a, b)) in bonds  # every atom is placed from a bonded neighbour
    for a, b, c, _ in zmatrix.rows[3:]:
        assert frozenset((b, c)) in bonds
    hydrogen = [atom.element.symbol == "H" for atom in mol.topology.atoms()]
    tail = [hydrogen[a] for a in zmatrix.rows[5:, 0]]
    assert tail == sorted(tail)  # heavy atoms before hydrogens (after the root and its neighbours)
    # methyl hydrogens: the first carries the rotor torsion, the others their offset from it
    assert [12, 10, 8, 11] in zmatrix.rows.tolist() and [13, 10, 8, 11] in zmatrix.rows.tolist()


def test_tripeptide_zmatrix_finds_every_backbone_torsion():
    mol = load_system(str(TRIPEPTIDE))
    zmatrix = ZMatrix.from_topology(mol.topology)
    assert mol.n_atoms == 53 and zmatrix.supports_mixed and zmatrix.supports_global
    traj = mdtraj.Trajectory(mol.positions[None], mol.mdtraj_topology())
    backbone = np.concatenate([mdtraj.compute_phi(traj)[0], mdtraj.compute_psi(traj)[0]])
    assert len(backbone) == 6
    for scheme in ("mixed", "global"):
        for atoms in backbone:
            assert zmatrix.torsion_row(atoms, scheme) is not None, (scheme, atoms)
    # the Phe ring: one ring-closing bond is not a z-matrix bond, all others are
    tree_bonds = {frozenset((a, b)) for a, b, _, _ in zmatrix.rows[1:]}
    assert len(bonded_pairs(mol.topology) - tree_bonds) == 1


@pytest.mark.parametrize("rings", [True, False])
@pytest.mark.parametrize("scheme", ["mixed", "global"])
def test_tripeptide_transform(scheme, rings):
    mol = load_system(str(TRIPEPTIDE))
    frames = perturbed(mol.positions, 80)
    transform = InternalCoordinateTransform.from_system(mol, frames[:60], scheme=scheme, rings=rings)
    assert transform.dim == 3 * 53 - 6 and len(transform.ring_blocks) == rings
    assert transform.ring_slices[-1:] == ([slice(3 * 53 - 6 - 27, 3 * 53 - 6)] if rings else [])
    distance_error, ic_error, logdet_error = round_trip_error(transform, frames[60:])
    assert distance_error < 1e-10 and ic_error < 1e-9 and logdet_error < 1e-9
    traj = mdtraj.Trajectory(frames[60:], mol.mdtraj_topology())
    ic, _ = transform.inverse(torch.tensor(frames[60:]))
    atoms, phi = mdtraj.compute_phi(traj)
    for k in range(3):
        diff = np.remainder(ic[:, transform.torsion_index(atoms[k])].numpy() - phi[:, k] + np.pi, 2 * np.pi) - np.pi
        assert np.abs(diff).max() < 1e-5


@pytest.mark.parametrize("scheme", ["mixed", "global"])
def test_ring_block_logdet_is_the_full_jacobian(scheme):
    """With the phenyl ring in a local frame, logdet (orbit-corrected) equals log|det| of the full square map
    (ic, translation, rotation) -> 3N Cartesian coordinates, by autograd: the frame's rotation adds nothing,
    the whitening its constant."""
    mol = load_system(str(TRIPEPTIDE))
    frames = perturbed(mol.positions, 80, seed=2)
    transform = InternalCoordinateTransform.from_system(mol, frames[:60], scheme=scheme).double()
    assert len(transform.ring_blocks) == 1
    ic, logdet_inverse = transform.inverse(torch.tensor(frames[60:62]))
    for i in range(2):
        point = torch.cat([ic[i], torch.zeros(6, dtype=torch.float64)])
        full_jac = torch.autograd.functional.jacobian(lambda v: full_map(transform, v), point)
        assert -logdet_inverse[i].item() == pytest.approx(slogdet(full_jac), abs=1e-8)


def test_fragments_hang_from_the_main_root():
    """Alanine dipeptide plus a water: the water becomes distance/angles/torsions relative to the peptide."""
    mol = load_system("alanine_dipeptide_vacuum")
    modeller = app.Modeller(mol.topology, mol.positions)
    water = app.Topology()
    residue = water.addResidue("HOH", water.addChain())
    oxygen = water.addAtom("O", app.element.oxygen, residue)
    for name in ("H1", "H2"):
        water.addBond(oxygen, water.addAtom(name, app.element.hydrogen, residue))
    modeller.add(water, np.array([[0.9, 0.9, 0.0], [0.99, 0.9, 0.0], [0.87, 0.99, 0.0]]) * unit.nanometer)
    topology = modeller.topology
    positions = np.asarray(modeller.getPositions().value_in_unit(unit.nanometer))
    zmatrix = ZMatrix.from_topology(topology)
    assert zmatrix.n_atoms == 25 and zmatrix.rigid.tolist() == [6, 8, 9, 10, 14]
    water_row = zmatrix.rows[zmatrix.rows[:, 0] == 22][0]
    assert water_row[1] == 8  # virtual bond from the water oxygen to the main root (CA)
    for scheme in ("mixed", "global"):
        frames = perturbed(positions, 40, seed=1)
        transform = InternalCoordinateTransform(zmatrix, frames[:30], scheme=scheme)
        assert transform.dim == 3 * 25 - 6
        errors = round_trip_error(transform, frames[30:])
        assert max(errors) < 1e-9


def butanol():
    """1-butanol as an openmm Topology without residue conventions (generic main-chain detection)."""
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    heavy = [topology.addAtom(name, element, residue) for name, element in
             (("C1", app.element.carbon), ("C2", app.element.carbon), ("C3", app.element.carbon),
              ("C4", app.element.carbon), ("O1", app.element.oxygen))]
    for a, b in zip(heavy, heavy[1:]):
        topology.addBond(a, b)
    for atom, n_h in zip(heavy, (3, 2, 2, 2, 1)):
        for _ in range(n_h):
            topology.addBond(atom, topology.addAtom("H", app.element.hydrogen, residue))
    return topology


def test_non_peptide_molecule():
    topology = butanol()
    zmatrix = ZMatrix.from_topology(topology)
    assert zmatrix.rows[0, 0] == 2 and zmatrix.rigid.tolist() == [1, 2, 3, 10, 11]  # C3 is the centre of C1..O1
    assert [0, 1, 2, 3] in zmatrix.rows.tolist() and [4, 3, 2, 1] in zmatrix.rows.tolist()  # backbone torsions
    # a staggered geometry from the global scheme: tetrahedral angles, anti backbone, hydrogens +-120 deg apart
    builder = InternalCoordinateTransform(zmatrix, np.random.default_rng(0).standard_normal((1, 15, 3)),
                                          scheme="global", normalize=False)
    ic = torch.zeros(1, builder.dim, dtype=torch.float64)
    for k, (a, b) in enumerate(builder.atoms_of("bonds")):
        ic[0, k] = 0.109 if max(a, b) > 4 else (0.143 if 4 in (a, b) else 0.153)
    ic[0, builder.angle_slice] = np.deg2rad(109.5)
    offsets = {}
    for k, (a, b, c, d) in enumerate(builder.atoms_of("torsions")):
        sibling = d in zmatrix.rows[zmatrix.rows[:, 1] == b, 0]
        offsets[b] = offsets.get(b, 0) + sibling
        ic[0, builder.torsion_slice.start + k] = (2 * np.pi / 3) * (1 if offsets[b] == 1 else -1) if sibling else np.pi
    structure = builder.forward(ic)[0][0]
    assert torch.isfinite(structure).all() and torch.pdist(structure).min() > 0.1
    structure = structure.numpy()
    frames = perturbed(structure, 50, seed=2)
    for scheme in ("mixed", "global"):
        transform = InternalCoordinateTransform(zmatrix, frames[:40], scheme=scheme)
        assert max(round_trip_error(transform, frames[40:])) < 1e-9


def test_user_zmatrix_in_the_papers_format():
    mol = load_system("alanine_dipeptide_vacuum")
    user = ZMatrix(PAPER_ROWS, rigid=[6, 8, 9, 10, 14])
    assert user.supports_mixed and not user.supports_global
    with pytest.raises(ZMatrixError, match="one row per atom"):
        user.require("global")
    frames = perturbed(mol.positions, 40)
    transform = InternalCoordinateTransform(user, frames[:30])
    phi_row = user.rows_for("mixed").tolist().index([4, 6, 8, 14])
    assert transform.dim == 60 and transform.torsion_index([4, 6, 8, 14]) == 2 * 17 + phi_row
    assert max(round_trip_error(transform, frames[30:])) < 1e-9
    with pytest.raises(ZMatrixError, match="global"):
        InternalCoordinateTransform(user, frames, scheme="global")


@pytest.mark.parametrize("rows,rigid,message", [
    ([[0, 1, 2, 5], [1, 0, 2, 3], [2, 0, 1, 3]], [3, 4, 5], "before they are placed"),
    ([[0, 3, 4, 5], [0, 3, 4, 5]], [3, 4, 5], "more than one"),
    ([[0, 3, 3, 5]], [3, 4, 5], "repeats"),
    ([[0, 3, 4, 5]], [3, 4, 5, 6], "neither in a row"),
    ([[0, 3, 4, -1]], [3, 4, 5], "lacks references"),
    ([[0, 3, 4, 9]], [3, 4, 5], r"\[-1, 5\]"),
])
def test_malformed_user_zmatrices(rows, rigid, message):
    with pytest.raises(ZMatrixError, match=message):
        ZMatrix(rows, rigid=rigid, n_atoms=6 if message != "neither in a row" else 7)


def test_too_small_molecule_is_refused():
    with pytest.raises(ZMatrixError, match="at least 3 atoms"):
        ZMatrix.from_topology(load_system("double_well").topology)


@pytest.mark.parametrize("with_rings", [False, True])
def test_stages_place_each_atom_after_its_references(with_rings):
    topology = load_system(str(TRIPEPTIDE)).topology
    zmatrix = ZMatrix.from_topology(topology)
    rows = zmatrix.rows_for("mixed")
    placed = set(zmatrix.rigid.tolist())
    blocks = ring_blocks(MolecularGraph.from_topology(topology), rows, zmatrix.rigid.tolist()) if with_rings else []
    assert len(blocks) == with_rings  # the phenyl ring
    in_blocks = [a for _, atoms in blocks for a in atoms]
    rows = rows[~np.isin(rows[:, 0], in_blocks)]
    groups = stages(rows, placed, blocks)
    assert sorted(np.concatenate([g for g, _ in groups]).tolist()) == list(range(len(rows)))
    assert sorted(b for _, bs in groups for b in bs) == list(range(len(blocks)))
    for group, block_ids in groups:
        assert all(int(r) in placed for row in rows[group] for r in row[1:])
        assert all(a in placed for b in block_ids for a in blocks[b][0])
        placed.update(rows[group, 0].tolist())
        placed.update(a for b in block_ids for a in blocks[b][1])
    assert len(placed) == zmatrix.n_atoms
    assert len(groups) < len(rows) / 4  # vectorized: far fewer stages than atoms


def test_ring_systems_and_their_blocks():
    """The phenyl ring of Ace-Ala-Ser-Phe-Nme is one ring system; its block holds the ring's other four carbons
    and the five ring hydrogens, in the frame of CG, CD1 and CB (chi2 stays a torsion)."""
    topology = load_system(str(TRIPEPTIDE)).topology
    names = {a.index: (a.residue.name, a.name) for a in topology.atoms()}
    graph = MolecularGraph.from_topology(topology)
    systems = graph.ring_systems(10)
    assert [sorted(names[a][1] for a in s) for s in systems] == [sorted(["CG", "CD1", "CD2", "CE1", "CE2", "CZ"])]
    assert graph.ring_systems(5) == []
    zmatrix = ZMatrix.from_topology(topology)
    (frame, atoms), = ring_blocks(graph, zmatrix.rows_for("mixed"), zmatrix.rigid.tolist())
    assert [names[a][1] for a in frame] == ["CG", "CD1", "CB"]
    assert sorted(names[a][1] for a in atoms) == sorted(["CD2", "CE1", "CE2", "CZ", "HD1", "HD2", "HE1", "HE2", "HZ"])
    # a ring that holds an atom of the rigid block keeps its rows
    rows = zmatrix.rows_for("mixed")
    assert ring_blocks(graph, rows[rows[:, 0] != atoms[0]], list(zmatrix.rigid) + [atoms[0]]) == []

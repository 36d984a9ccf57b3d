"""InternalCoordinateTransform on MD frames: round trips, exact log-determinants, mdtraj agreement, invariance."""
import copy

import mdtraj
import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openmm_snf.coordinates import InternalCoordinateTransform, ZMatrix
from openmm_snf.coordinates.geometry import skew
from openmm_snf.systems import MolecularSystem, load_system

ALDP = ["alanine_dipeptide_vacuum", "alanine_dipeptide_implicit"]
SCHEMES = ["mixed", "global"]
# round-trip tolerance in nm, per dtype (issue 4)
ROUND_TRIP_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def md_frames(name, n_frames=200, stride=20, seed=1):
    """Langevin MD frames (n_frames, n_atoms, 3) nm at the system's temperature, CPU platform, 1 fs steps."""
    mol = load_system(name)
    integrator = openmm.LangevinMiddleIntegrator(mol.temperature * unit.kelvin, 5.0 / unit.picosecond,
                                                 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(mol.system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    context.setPositions(mol.positions * unit.nanometer)
    context.setVelocitiesToTemperature(mol.temperature * unit.kelvin, seed)
    integrator.step(200)
    frames = []
    for _ in range(n_frames):
        integrator.step(stride)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return mol, np.asarray(frames)


@pytest.fixture(scope="module")
def aldp():
    """{name: (MolecularSystem, frames)} for both alanine dipeptide systems (about 2 s of MD in all)."""
    return {name: md_frames(name) for name in ALDP}


def make(aldp, name, scheme, **kwargs):
    mol, frames = aldp[name]
    return InternalCoordinateTransform.from_system(mol, frames[:150], scheme=scheme, **kwargs), frames[150:]


def superpose(mobile, target):
    """Rigidly move each (N, 3) configuration of ``mobile`` onto ``target`` (numpy float64 Kabsch)."""
    out = []
    for m, t in zip(mobile, target):
        mc, tc = m - m.mean(0), t - t.mean(0)
        u, _, vt = np.linalg.svd(mc.T @ tc)
        d = np.sign(np.linalg.det(vt.T @ u.T))
        out.append(mc @ (vt.T @ np.diag([1, 1, d]) @ u.T).T + t.mean(0))
    return np.asarray(out)


def random_rigid_motion(x, seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    return x @ q.T + rng.uniform(-5, 5, size=3)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ALDP)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_md_frames(aldp, name, scheme, dtype):
    transform, frames = make(aldp, name, scheme)
    x = torch.tensor(frames, dtype=dtype)
    ic, logdet_inv = transform.inverse(x)
    assert ic.dtype == dtype and ic.shape == (len(frames), transform.dim) and logdet_inv.shape == (len(frames),)
    back, logdet_fwd = transform.forward(ic)
    assert back.dtype == dtype and back.shape == x.shape
    err = np.abs(superpose(frames, back.double().numpy()) - back.double().numpy()).max()
    assert err <= ROUND_TRIP_TOL[dtype]
    ic_again, _ = transform.inverse(back)
    periodic = transform.periodic_mask
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(ic_again[:, ~periodic], ic[:, ~periodic], atol=tol)
    torsion_diff = torch.remainder(ic_again[:, periodic] - ic[:, periodic] + np.pi, 2 * np.pi) - np.pi
    assert torsion_diff.abs().max() <= tol
    assert torch.allclose(logdet_fwd + logdet_inv, torch.zeros_like(logdet_fwd), atol=tol)
    assert transform.statistics == {"clamped_bonds": 0, "clamped_angles": 0, "degenerate_frames": 0}


def test_aldp_dimensions_and_layout(aldp):
    mixed, _ = make(aldp, ALDP[0], "mixed")
    glob, _ = make(aldp, ALDP[0], "global")
    assert mixed.dim == 60 and glob.dim == 60
    assert mixed.zmatrix.rigid.tolist() == [6, 8, 9, 10, 14]
    assert (mixed.n_bonds, mixed.n_angles, mixed.n_torsions, mixed.rigid.dim) == (17, 17, 17, 9)
    assert (glob.n_bonds, glob.n_angles, glob.n_torsions) == (21, 20, 19)
    for t in (mixed, glob):
        assert t.periodic_mask.dtype == torch.bool and t.periodic_mask.sum() == t.n_torsions
        assert t.periodic_mask[t.torsion_slice].all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_standardized_statistics(aldp, scheme):
    """On its own reference frames, standardized bonds/angles have mean 0 and std 1; the block is white."""
    mol, frames = aldp[ALDP[0]]
    transform = InternalCoordinateTransform.from_system(mol, frames, scheme=scheme)
    ic, _ = transform.inverse(torch.tensor(frames))
    standardized = torch.cat([ic[:, transform.bond_slice], ic[:, transform.angle_slice]], dim=1)
    assert torch.allclose(standardized.mean(0), torch.zeros(1, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(standardized.std(0), torch.ones(1, dtype=torch.float64), atol=1e-9)
    if scheme == "mixed":
        block = ic[:, transform.cartesian_slice]
        assert torch.allclose(torch.cov(block.T), torch.eye(block.shape[1], dtype=torch.float64), atol=1e-8)
    torsions = ic[:, transform.torsion_slice]
    assert torsions.min() >= -np.pi and torsions.max() < np.pi


# ---------------------------------------------------------------------------- exact log-determinants
def reduced_coordinates(transform, x):
    """(B, N, 3) configurations on the transform's section -> (B, dim) reduced Cartesian coordinates."""
    if transform.scheme == "mixed":
        rigid = transform.rigid
        block = (x[:, transform.zmatrix.rigid] - rigid.target).reshape(len(x), -1) @ rigid.section_basis
        others = np.setdiff1d(np.arange(transform.n_atoms), transform.zmatrix.rigid)
        return torch.cat([block, x[:, others].reshape(len(x), -1)], dim=1)
    head = transform.zmatrix.rows[:3, 0]
    others = transform.zmatrix.rows[3:, 0]
    return torch.cat([x[:, head[1], :1], x[:, head[2], :2], x[:, others].reshape(len(x), -1)], dim=1)


def from_reduced(transform, reduced):
    """Inverse of :func:`reduced_coordinates`: (B, dim) -> (B, N, 3) on the section."""
    batch, n_atoms = reduced.shape[0], transform.n_atoms
    x = reduced.new_zeros(batch, n_atoms, 3)
    if transform.scheme == "mixed":
        rigid, atoms = transform.rigid, transform.zmatrix.rigid
        k = 3 * len(atoms) - 6
        block = rigid.target + (reduced[:, :k] @ rigid.section_basis.T).reshape(batch, -1, 3)
        others = np.setdiff1d(np.arange(n_atoms), atoms)
        return x.index_copy(1, torch.as_tensor(atoms), block).index_copy(
            1, torch.as_tensor(others), reduced[:, k:].reshape(batch, -1, 3))
    head, others = transform.zmatrix.rows[:3, 0], transform.zmatrix.rows[3:, 0]
    zero = reduced[:, 0] * 0
    head_xyz = torch.stack([torch.stack([zero, zero, zero], -1), torch.stack([reduced[:, 0], zero, zero], -1),
                            torch.stack([reduced[:, 1], reduced[:, 2], zero], -1)], dim=1)
    return x.index_copy(1, torch.as_tensor(head), head_xyz).index_copy(
        1, torch.as_tensor(others), reduced[:, 3:].reshape(batch, -1, 3))


def full_map(transform, vector):
    """(dim + 6,) = (ic, translation t, rotation vector w) -> (3N,): exp(w x) forward(ic) + t."""
    ic, t, w = vector[:transform.dim], vector[transform.dim:transform.dim + 3], vector[transform.dim + 3:]
    x = transform.forward(ic[None])[0][0]
    return (x @ torch.linalg.matrix_exp(skew(w)).T + t).reshape(-1)


def slogdet(matrix):
    sign, value = torch.linalg.slogdet(matrix)
    assert sign != 0
    return value.item()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("normalize", [True, False])
def test_logdet_equals_autograd_jacobian(aldp, scheme, normalize):
    jacobian = torch.autograd.functional.jacobian
    corrected, frames = make(aldp, ALDP[0], scheme, normalize=normalize)
    plain, _ = make(aldp, ALDP[0], scheme, normalize=normalize, orbit_correction=False)
    ic, logdet_inverse = plain.inverse(torch.tensor(frames[:3]))
    _, logdet_corrected = corrected.forward(ic)
    for i in range(3):
        # uncorrected: the square map IC <-> reduced Cartesian coordinates on the section
        forward_jac = jacobian(lambda v: reduced_coordinates(plain, plain.forward(v[None])[0])[0], ic[i])
        _, logdet_forward = plain.forward(ic[i:i + 1])
        assert logdet_forward.item() == pytest.approx(slogdet(forward_jac), abs=1e-8)
        section_point = reduced_coordinates(plain, plain.forward(ic[i:i + 1])[0])[0]
        inverse_jac = jacobian(lambda r: plain.inverse(from_reduced(plain, r[None]))[0][0], section_point)
        assert logdet_inverse[i].item() == pytest.approx(slogdet(inverse_jac), abs=1e-8)
        # corrected: the full square 3N map including the 6 rigid-body coordinates
        point = torch.cat([ic[i], torch.zeros(6, dtype=torch.float64)])
        full_jac = jacobian(lambda v: full_map(corrected, v), point)
        assert full_jac.shape == (3 * corrected.n_atoms, 3 * corrected.n_atoms)
        assert logdet_corrected[i].item() == pytest.approx(slogdet(full_jac), abs=1e-8)
    # forward + inverse = 0 for the corrected transform too
    x, logdet_forward = corrected.forward(ic)
    assert torch.allclose(corrected.inverse(x)[1] + logdet_forward, torch.zeros(3, dtype=torch.float64),
                          atol=1e-10)


def test_global_corrected_logdet_is_textbook_jacobian(aldp):
    """Global scheme with orbit correction: logdet = sum over atoms of log(r^2 sin theta) (atom 2: log r^2)."""
    transform, frames = make(aldp, ALDP[0], "global", normalize=False)
    x = torch.tensor(frames[:5])
    ic, logdet = transform.inverse(x)
    bonds, angles = transform.bonds(ic), transform.angles(ic)
    expected = 2 * bonds.log().sum(-1) + angles.sin().log().sum(-1)
    assert torch.allclose(-logdet, expected, atol=1e-12)


# ---------------------------------------------------------------------------- agreement with mdtraj
@pytest.mark.parametrize("name", ALDP)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_internal_coordinates_match_mdtraj(aldp, name, scheme):
    transform, frames = make(aldp, name, scheme)
    mol = aldp[name][0]
    traj = mdtraj.Trajectory(frames, mol.mdtraj_topology())
    ic, _ = transform.inverse(torch.tensor(frames))
    bonds = mdtraj.compute_distances(traj, transform.atoms_of("bonds"), periodic=False)
    angles = mdtraj.compute_angles(traj, transform.atoms_of("angles"), periodic=False)
    torsions = mdtraj.compute_dihedrals(traj, transform.atoms_of("torsions"), periodic=False)
    np.testing.assert_allclose(transform.bonds(ic).numpy(), bonds, atol=1e-6)
    np.testing.assert_allclose(transform.angles(ic).numpy(), angles, atol=1e-5)
    diff = np.remainder(transform.torsions(ic).numpy() - torsions + np.pi, 2 * np.pi) - np.pi
    assert np.abs(diff).max() < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_phi_psi_are_torsions(aldp, scheme):
    transform, frames = make(aldp, ALDP[0], scheme)
    mol = aldp[ALDP[0]][0]
    traj = mdtraj.Trajectory(frames, mol.mdtraj_topology())
    ic, _ = transform.inverse(torch.tensor(frames))
    for cv, compute in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi)):
        atoms, values = compute(traj)
        assert atoms[0].tolist() == mol.cvs[cv]["atoms"]
        index = transform.torsion_index(mol.cvs[cv]["atoms"])
        assert transform.periodic_mask[index]
        diff = np.remainder(ic[:, index].numpy() - values[:, 0] + np.pi, 2 * np.pi) - np.pi
        assert np.abs(diff).max() < 1e-5
    with pytest.raises(KeyError, match="not a torsion"):
        transform.torsion_index([0, 1, 2, 3])


# ---------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("scheme", SCHEMES)
def test_rigid_motion_invariance(aldp, scheme):
    transform, frames = make(aldp, ALDP[1], scheme)
    ic, logdet = transform.inverse(torch.tensor(frames))
    moved = random_rigid_motion(frames, seed=3)
    ic_moved, logdet_moved = transform.inverse(torch.tensor(moved))
    periodic = transform.periodic_mask
    assert torch.allclose(ic_moved[:, ~periodic], ic[:, ~periodic], atol=1e-10)
    diff = torch.remainder(ic_moved[:, periodic] - ic[:, periodic] + np.pi, 2 * np.pi) - np.pi
    assert diff.abs().max() < 1e-10
    assert torch.allclose(logdet_moved, logdet, atol=1e-10)


def test_mixed_forward_is_on_the_aligned_section(aldp):
    """forward() places the block Kabsch-aligned on the target (centroid at the origin), inverse() finds it."""
    transform, frames = make(aldp, ALDP[0], "mixed")
    x, _ = transform.forward(torch.zeros(4, transform.dim, dtype=torch.float64))
    block = x[:, transform.zmatrix.rigid]
    assert torch.allclose(block.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    residual = (block - transform.rigid.target).reshape(4, -1) @ transform.rigid.motion_basis
    assert residual.abs().max() < 1e-12


# ---------------------------------------------------------------------------- guards, devices, contract
def test_clamping_is_counted_and_finite(aldp):
    transform, frames = make(aldp, ALDP[0], "mixed")
    ic, _ = transform.inverse(torch.tensor(frames[:4]))
    wild = ic.clone()
    wild[0, transform.bond_slice.start] = -1e3                 # negative bond length
    wild[1, transform.angle_slice.start] = 1e3                 # angle far beyond pi
    wild[2, transform.angle_slice.start] = -1e3                # angle below 0
    x, logdet = transform.forward(wild)
    assert torch.isfinite(x).all() and torch.isfinite(logdet).all()
    stats = transform.statistics
    assert stats["clamped_bonds"] == 1 and stats["clamped_angles"] == 2
    # coincident and collinear atoms on the Cartesian side
    bad = torch.tensor(frames[:2])
    bad[0, 0] = bad[0, 1]                                      # H1 on top of CH3
    bad[1, 4] = bad[1, 6] + 2 * (bad[1, 6] - bad[1, 8])        # C, N, CA collinear (angle pi)
    transform.reset_statistics()
    ic_bad, logdet_bad = transform.inverse(bad)
    assert torch.isfinite(ic_bad).all() and torch.isfinite(logdet_bad).all()
    assert transform.statistics["clamped_bonds"] >= 1 and transform.statistics["clamped_angles"] >= 1
    x_bad, _ = transform.forward(ic_bad)
    assert torch.isfinite(x_bad).all() and transform.statistics["degenerate_frames"] >= 1


def test_gradients_flow(aldp):
    transform, frames = make(aldp, ALDP[0], "mixed")
    ic, _ = transform.inverse(torch.tensor(frames[:8]))
    ic.requires_grad_(True)
    x, logdet = transform.forward(ic)
    (x.square().sum() + logdet.sum()).backward()
    assert torch.isfinite(ic.grad).all() and ic.grad.abs().sum() > 0


def test_state_dict_restores_statistics(aldp):
    mol, frames = aldp[ALDP[0]]
    trained = InternalCoordinateTransform.from_system(mol, frames[:100])
    other = InternalCoordinateTransform.from_system(mol, frames[100:])
    x = torch.tensor(frames[150:])
    assert not torch.allclose(trained.inverse(x)[0], other.inverse(x)[0])
    other.load_state_dict(copy.deepcopy(trained.state_dict()))
    for a, b in zip(trained.inverse(x), other.inverse(x)):
        assert torch.equal(a, b)


def test_boundary_errors(aldp):
    mol, frames = aldp[ALDP[0]]
    transform = InternalCoordinateTransform.from_system(mol, frames[:50])
    with pytest.raises(ValueError, match="shape"):
        transform.forward(torch.zeros(2, 59, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        transform.inverse(torch.zeros(2, 22, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="reference"):
        InternalCoordinateTransform.from_system(mol, frames[:, :21])
    with pytest.raises(ValueError, match="at least 2 reference frames"):
        InternalCoordinateTransform.from_system(mol, frames[0], scheme="global")
    with pytest.raises(ValueError, match="scheme"):
        InternalCoordinateTransform.from_system(mol, frames, scheme="polar")
    # one frame (e.g. a minimized structure) is enough without normalization
    single = InternalCoordinateTransform.from_system(mol, mol.positions, normalize=False)
    back, _ = single.forward(single.inverse(torch.tensor(frames[:3]))[0])
    assert np.abs(superpose(frames[:3], back.numpy()) - back.numpy()).max() < 1e-10


def test_constrained_system_is_refused():
    mol = load_system(ALDP[0])
    system = copy.deepcopy(mol.system)
    system.addConstraint(0, 1, 0.109)
    constrained = MolecularSystem(mol.name, mol.topology, system, mol.positions, mol.temperature)
    with pytest.raises(ValueError, match="constrains 1 distance"):
        InternalCoordinateTransform.from_system(constrained, mol.positions, normalize=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(aldp, dtype):
    transform, frames = make(aldp, ALDP[0], "mixed")
    x = torch.tensor(frames, dtype=dtype)
    ic_cpu, logdet_cpu = transform.inverse(x)
    transform.cuda()
    ic_gpu, logdet_gpu = transform.inverse(x.cuda())
    back, logdet_back = transform.forward(ic_gpu)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(ic_gpu.cpu(), ic_cpu, atol=tol) and torch.allclose(logdet_gpu.cpu(), logdet_cpu, atol=tol)
    assert torch.allclose(logdet_back + logdet_gpu, torch.zeros_like(logdet_gpu), atol=tol)
    assert back.device.type == "cuda"


def test_sampled_internal_coordinates_round_trip(aldp):
    """Flow-like samples (standard normal bonds/angles/block up to 4 sigma, uniform torsions) come back exactly:
    the Kabsch alignment in inverse() recovers the pose that forward() chose."""
    transform, _ = make(aldp, ALDP[0], "mixed")
    generator = torch.Generator().manual_seed(5)
    ic = torch.randn(512, transform.dim, generator=generator, dtype=torch.float64).clamp(-4, 4)
    ic[:, transform.torsion_slice] = (torch.rand(512, transform.n_torsions, generator=generator,
                                                 dtype=torch.float64) * 2 - 1) * np.pi
    x, logdet = transform.forward(ic)
    ic_back, logdet_back = transform.inverse(x)
    assert torch.allclose(ic_back, ic, atol=1e-9) and torch.allclose(logdet + logdet_back,
                                                                      torch.zeros_like(logdet), atol=1e-9)


def test_global_scheme_with_chain_head(aldp):
    """A user global z-matrix whose third atom is bonded to the second (N, CA, C) instead of the first."""
    mol, frames = aldp[ALDP[0]]
    auto = ZMatrix.from_topology(mol.topology)
    rows = [[6, -1, -1, -1], [8, 6, -1, -1], [14, 8, 6, -1]] + auto.rows[3:].tolist()
    transform = InternalCoordinateTransform(ZMatrix(rows), frames[:150], scheme="global")
    x = torch.tensor(frames[150:])
    ic, logdet = transform.inverse(x)
    back, logdet_back = transform.forward(ic)
    assert np.abs(superpose(frames[150:], back.numpy()) - back.numpy()).max() < 1e-10
    assert torch.allclose(logdet + logdet_back, torch.zeros_like(logdet), atol=1e-10)
    point = torch.cat([ic[0], torch.zeros(6, dtype=torch.float64)])
    full_jac = torch.autograd.functional.jacobian(lambda v: full_map(transform, v), point)
    assert logdet_back[0].item() == pytest.approx(slogdet(full_jac), abs=1e-8)

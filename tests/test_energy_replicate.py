"""Replicated Systems, the expression evaluator and the training-only regularizers."""
import math

import numpy as np
import openmm
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import build_replicated_system, clip_forces, grid_offsets, linlogcut, max_copy_radius
from openmm_snf.energy.expression import ExpressionError, parse, substitute_variables
from openmm_snf.energy.terms import ONE_4PI_EPS0


def reference_state(system, positions):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value


@pytest.mark.parametrize("name", ["alanine_dipeptide_implicit", "double_well"])
def test_replicated_forces_are_exact_and_energy_shift_is_known(name):
    mol = load_system(name)
    n_copies = 5
    system, offsets = build_replicated_system(mol.system, n_copies)
    assert offsets.shape == (n_copies, 3) and system.getNumParticles() == n_copies * mol.n_atoms
    rng = np.random.default_rng(0)
    xs = mol.positions[None] + 0.02 * rng.standard_normal((n_copies, mol.n_atoms, 3))
    singles = [reference_state(mol.system, x) for x in xs]
    total, forces = reference_state(system, (xs + offsets[:, None, :]).reshape(-1, 3))
    expected = np.stack([f for _, f in singles])
    assert np.abs(forces.reshape(expected.shape) - expected).max() <= 1e-10 * np.abs(expected).max()
    # NoCutoff Coulomb becomes cutoff Coulomb with eps_rf = 1: each non-excluded pair gains -q_i q_j / r_c
    shift = 0.0
    nonbonded = [f for f in mol.system.getForces() if isinstance(f, openmm.NonbondedForce)]
    if nonbonded:
        force = nonbonded[0]
        q = [force.getParticleParameters(i)[0]._value for i in range(mol.n_atoms)]
        excluded = {tuple(sorted(force.getExceptionParameters(e)[:2])) for e in range(force.getNumExceptions())}
        cutoff = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)).getCutoffDistance()._value
        shift = -ONE_4PI_EPS0 / cutoff * sum(q[i] * q[j] for i in range(mol.n_atoms) for j in range(i + 1, mol.n_atoms)
                                             if (i, j) not in excluded)
    assert abs(total - sum(e for e, _ in singles) - n_copies * shift) < 1e-6


def test_copy_radius_bounds():
    mol = load_system("alanine_dipeptide_vacuum")
    assert max_copy_radius(mol.system, 4.0) == pytest.approx(1.0)
    assert math.isinf(max_copy_radius(load_system("double_well").system, 1.0))
    with pytest.raises(ValueError, match="n_copies"):
        build_replicated_system(mol.system, 0)
    grid = grid_offsets(9, 2.0)
    assert len(np.unique(grid, axis=0)) == 9 and np.abs(grid).max() <= 2.0


def test_expression_evaluator_matches_lepton_semantics():
    expression = parse("a*select(step(r-1), 2, -3) + b^-2 + max(r, 0.5) - 2^3^2; b=c+1; c=2*a")
    r = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    a = 1.5
    expected = a * torch.where(r >= 1, 2.0, -3.0) + (2 * a + 1) ** -2 + torch.clamp(r, min=0.5) - 2 ** 9
    assert torch.allclose(expression.evaluate({"r": r, "a": a}), expected)
    assert expression.variables == {"r", "a"}
    assert substitute_variables("x^2+xx*x", {"x": "(x-o)"}) == "(x-o)^2+xx*(x-o)"
    with pytest.raises(ExpressionError, match="not supported"):
        parse("myTable(r)")


def test_linlogcut_and_force_clipping():
    u = torch.tensor([-5.0, 100.0, 600.0, 1e8, float("inf"), float("nan")], requires_grad=True)
    out = linlogcut(u, high=500.0, max=1e4)
    cap = 500.0 + math.log1p(1e4 - 500.0)
    values = out.detach()
    assert values[0] == -5.0 and values[1] == 100.0
    assert values[2].item() == pytest.approx(500.0 + math.log1p(100.0))
    assert values[3].item() == pytest.approx(cap) and values[4].item() == pytest.approx(cap)
    assert torch.isnan(values[5])
    out[:4].sum().backward()
    assert u.grad[:4].tolist() == pytest.approx([1.0, 1.0, 1.0 / 101.0, 0.0])
    forces = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 1.0, 0.0]], [[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]]])
    clipped = clip_forces(forces, 1.0)
    assert torch.allclose(clipped[0], forces[0] / 5.0) and torch.equal(clipped[1], forces[1])

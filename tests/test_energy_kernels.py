"""The compiled kernel: the same numbers as the float64 torch terms and OpenMM's Reference platform."""
import os

import numba
import numpy as np
import openmm
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy, SequentialEnergy
from openmm_snf.energy.kernels import CompiledTerms
from openmm_snf.energy.terms import build_energy_terms, evaluate_term, to_components
from conftest import clone, gbsaobc_and_cutoff, variant


def perturbed(mol, n, scale=0.02, seed=0):
    rng = np.random.default_rng(seed)
    return mol.positions[None] + scale * rng.standard_normal((n, mol.n_atoms, 3))


def torch_terms(terms, indices, x):
    """Energies and forces of the torch terms ``indices`` (analytic gradients), float64 numpy."""
    c = to_components(torch.as_tensor(x))
    grad = torch.zeros_like(c)
    energy = sum(evaluate_term(term, c, grad) for i, term in terms if i in indices)
    return energy.numpy(), -grad.permute(2, 1, 0).numpy()


def extra_terms():
    """ALDP in vacuum plus a second bond force, torsions whose periodicities come unsorted
    on an existing dihedral, and a second NonbondedForce (left to the torch terms)."""
    mol = load_system("alanine_dipeptide_vacuum")
    system = clone(mol.system)
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 4, 0.3, 500.0)
    torsions = openmm.PeriodicTorsionForce()
    for n, phase, k in [(3, 0.2, 1.5), (1, -1.0, 0.7), (6, 3.0, 0.2), (2, 0.4, 0.3), (3, 1.1, 0.4)]:
        torsions.addTorsion(4, 6, 8, 14, n, phase, k)
    torsions.addTorsion(6, 8, 14, 16, 2, np.pi, 2.0)
    second = openmm.NonbondedForce()
    for i in range(system.getNumParticles()):
        second.addParticle(0.1 * (-1) ** i, 0.3, 0.2 if i % 3 else 0.0)
    second.addException(0, 1, 0.0, 0.1, 0.0)
    for force in (bonds, torsions, second):
        system.addForce(force)
    return variant(mol, system, "extra_terms")


@pytest.mark.parametrize("make", [lambda: load_system("alanine_dipeptide_vacuum"), gbsaobc_and_cutoff, extra_terms],
                         ids=["vacuum", "cutoff_switching", "extra_terms"])
def test_kernel_equals_torch_terms_and_reference(make):
    mol = make()
    terms, _ = build_energy_terms(mol.system)
    compiled = CompiledTerms(terms)
    x = perturbed(mol, 7, scale=0.03)
    energy, forces = compiled(x)
    expected_energy, expected_forces = torch_terms(terms, set(compiled.indices), x)
    assert np.all(np.abs(energy - expected_energy) <= 1e-9 * np.abs(expected_energy).max() + 1e-9)
    assert np.all(np.abs(forces - expected_forces) <= 1e-9 * np.abs(expected_forces).max())
    model = OpenMMEnergy(mol, platform="Reference", forces_from="compiled")
    u, f = model.energy_and_forces(torch.as_tensor(x))
    u_ref, f_ref = SequentialEnergy(mol).energy_and_forces(torch.as_tensor(x))
    assert torch.all((u - u_ref).abs() * model.kT < 1e-6)
    assert torch.all((f - f_ref).abs() <= 1e-7 * f_ref.abs().max())


def test_kernel_claims_one_nonbonded_force_and_leaves_the_rest():
    mol = extra_terms()
    terms, _ = build_energy_terms(mol.system)
    compiled = CompiledTerms(terms)
    kinds = [type(mol.system.getForce(i)).__name__ for i in compiled.indices]
    assert kinds.count("NonbondedForce") == 1 and kinds.count("PeriodicTorsionForce") == 2
    assert [type(mol.system.getForce(i)).__name__ for i, _ in compiled.rest] == ["NonbondedForce"]
    assert compiled.torsion_start[-1] == len(compiled.torsion_params)
    for u in range(len(compiled.quads)):  # periodicities sorted within each dihedral
        n = compiled.torsion_params[compiled.torsion_start[u]:compiled.torsion_start[u + 1], 0]
        assert np.all(np.diff(n) >= 0)


def test_results_do_not_depend_on_the_thread_count():
    mol = load_system("alanine_dipeptide_vacuum")
    terms, _ = build_energy_terms(mol.system)
    x = perturbed(mol, 33)
    one = CompiledTerms(terms, threads=1)(x)
    two = CompiledTerms(terms, threads=2)(x)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    alone = CompiledTerms(terms)(x[5:6])  # nor on the batch around a sample (one block: the serial kernel)
    assert np.array_equal(alone[0], one[0][5:6]) and np.array_equal(alone[1], one[1][5:6])


def test_overlapping_atoms_give_non_finite_results_without_an_exception():
    mol = load_system("alanine_dipeptide_vacuum")
    terms, _ = build_energy_terms(mol.system)
    x = perturbed(mol, 3)
    x[1, 10] = x[1, 0]  # two non-bonded atoms on top of each other
    energy, forces = CompiledTerms(terms)(x)
    assert not np.isfinite(energy[1]) and not np.isfinite(forces[1]).all()  # inf or inf - inf
    assert np.isfinite(energy[[0, 2]]).all() and np.isfinite(forces[[0, 2]]).all()


def test_parallel_kernel_runs_on_numba_workqueue_threads():
    """numba's OpenMP layer beside torch's made small torch ops ~1000x slower; the package picks workqueue."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        pytest.skip("the user chose numba's threading layer")
    mol = load_system("alanine_dipeptide_vacuum")
    terms, _ = build_energy_terms(mol.system)
    CompiledTerms(terms)(perturbed(mol, 100))  # > one block: the parallel kernel
    assert numba.threading_layer() == "workqueue"

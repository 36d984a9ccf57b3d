"""The private OpenMM shortcuts of energy/openmm_access.py and their public-API fallbacks agree."""
import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy, SequentialEnergy
from openmm_snf.energy import openmm_access
from openmm_snf.energy.openmm_access import md_value, read_forces


@pytest.fixture
def public_api_only(monkeypatch):
    """An OpenMM without ``Quantity._value`` or ``State._getVectorAsNumpy``, as the helpers see it."""
    def missing(quantity):
        raise KeyError("_value")
    monkeypatch.setattr(openmm_access, "_private_value", missing)
    monkeypatch.setattr(openmm_access, "_private_fill", lambda state: None)


def test_md_value_strips_md_units_and_passes_plain_values_through():
    assert md_value(unit.Quantity(1.5, unit.nanometer)) == 1.5
    assert md_value(2.0) == 2.0 and md_value(3) == 3


def test_md_value_fallback_converts_to_md_units(public_api_only):
    assert md_value(unit.Quantity(1.5, unit.nanometer)) == 1.5
    assert md_value(unit.Quantity(15.0, unit.angstrom)) == pytest.approx(1.5, rel=1e-15)
    assert md_value(unit.Quantity(1.0, unit.kilocalorie_per_mole)) == pytest.approx(4.184, rel=1e-15)


def _state(mol):
    context = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(mol.positions)
    return context.getState(getEnergy=True, getForces=True)


def test_read_forces_fallback_gives_the_same_forces(monkeypatch):
    mol = load_system("alanine_dipeptide_implicit")
    state = _state(mol)
    fast = read_forces(state, np.empty((mol.n_atoms, 3)))
    monkeypatch.setattr(openmm_access, "_private_fill", lambda state: None)
    public = read_forces(state, np.empty((mol.n_atoms, 3)))
    np.testing.assert_array_equal(fast, public)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        read_forces(state, np.empty((mol.n_atoms, 3), dtype=np.float32))


@pytest.mark.parametrize("name", ["alanine_dipeptide_implicit", "double_well"])
def test_the_bridges_agree_with_and_without_the_private_calls(name, request):
    mol = load_system(name)
    generator = torch.Generator().manual_seed(0)
    x = torch.as_tensor(mol.positions)[None] + 0.01 * torch.randn(3, mol.n_atoms, 3, generator=generator,
                                                                  dtype=torch.float64)
    results = []
    for private in (True, False):
        if not private:
            request.getfixturevalue("public_api_only")
        for model in (OpenMMEnergy(mol, platform="Reference", forces_from="torch"),
                      SequentialEnergy(mol, platform="Reference")):
            results.append(model.energy_and_forces(x))
    for fast, public in zip(results[:2], results[2:]):
        torch.testing.assert_close(fast, public, rtol=0, atol=0)

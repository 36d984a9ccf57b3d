"""Every supported force kind: batched per-sample energies and forces equal the Reference loop.

Variants of alanine dipeptide add the forces the shipped systems lack (GBSAOBCForce, cutoff
nonbonded with switching, RB/CMAP torsions, custom bonded and external forces, the app's GB models).
"""
import numpy as np
import openmm
import openmm.app as app
import pytest
import torch

from openmm_snf import load_system
from openmm_snf.energy import OpenMMEnergy, SequentialEnergy, build_replicated_system

from conftest import clone, gbsaobc_and_cutoff, variant


def custom_bonded_and_external():
    mol = load_system("alanine_dipeptide_vacuum")
    system = clone(mol.system)
    rb = openmm.RBTorsionForce()
    rb.addTorsion(4, 6, 8, 14, 1.0, 2.0, -3.0, 0.5, 0.2, -0.1)
    bond = openmm.CustomBondForce("k*(r-r0)^2 + select(step(r-0.2), 1, 2)")
    bond.addPerBondParameter("k")
    bond.addGlobalParameter("r0", 0.15)
    bond.addBond(0, 1, [3.0])
    angle = openmm.CustomAngleForce("k*cos(theta)^2")
    angle.addPerAngleParameter("k")
    angle.addAngle(4, 6, 8, [2.0])
    torsion = openmm.CustomTorsionForce("k*(1-cos(theta-t0)); t0=0.3")
    torsion.addPerTorsionParameter("k")
    torsion.addTorsion(4, 6, 8, 14, [2.0])
    compound = openmm.CustomCompoundBondForce(3, "distance(p1,p2)*angle(p1,p2,p3) + 0.1*dihedral(p1,p2,p3,p1)^2")
    compound.addBond([0, 1, 4], [])
    external = openmm.CustomExternalForce("a*((x-1)^2 + y^2) + z")  # not translation invariant
    external.addPerParticleParameter("a")
    external.addParticle(3, [100.0])
    external.addParticle(5, [20.0])
    cmap = openmm.CMAPTorsionForce()
    cmap.addMap(6, list(np.random.default_rng(0).normal(size=36)))
    cmap.addTorsion(0, 4, 6, 8, 14, 6, 8, 14, 16)
    spline = openmm.CustomCompoundBondForce(2, "table(distance(p1,p2))")  # spline table: sequential fallback
    spline.addTabulatedFunction("table", openmm.Continuous1DFunction([0.0, 1.0, 4.0, 9.0], 0.0, 0.6))
    spline.addBond([4, 6], [])
    for force in (rb, bond, angle, torsion, compound, external, cmap, spline):
        system.addForce(force)
    return variant(mol, system, "custom")


def app_gb_model(model):
    mol = load_system("alanine_dipeptide_vacuum")
    forcefield = app.ForceField("amber96.xml", f"implicit/{model}.xml")
    system = forcefield.createSystem(mol.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    return variant(mol, system, model)


VARIANTS = {"gbsaobc_cutoff": gbsaobc_and_cutoff, "custom": custom_bonded_and_external,
            "obc2": lambda: app_gb_model("obc2"), "gbn": lambda: app_gb_model("gbn"),
            "gbn2": lambda: app_gb_model("gbn2")}


@pytest.mark.parametrize("forces_from", ["compiled", "torch", "openmm"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_reference_loop(name, forces_from):
    mol = VARIANTS[name]()
    model = OpenMMEnergy(mol, platform="Reference", chunk_size=4, forces_from=forces_from)
    generator = torch.Generator().manual_seed(3)
    x = torch.as_tensor(mol.positions)[None] + 0.02 * torch.randn(5, mol.n_atoms, 3, generator=generator,
                                                                   dtype=torch.float64)
    x = x + torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)  # off-centre: external forces must see it
    u, f = model.energy_and_forces(x)
    u_ref, f_ref = SequentialEnergy(mol).energy_and_forces(x)
    assert torch.all((u - u_ref).abs() * model.kT < 1e-3)
    assert torch.all((f - f_ref).abs() <= 1e-4 * f_ref.abs().max())
    assert torch.all(model.last_flags == 0)
    assert torch.allclose(model.forces(x), f, rtol=0, atol=1e-9 * f_ref.abs().max())
    if name == "custom":
        assert model.sequential_forces == ["CMAPTorsionForce", "CustomCompoundBondForce"] and not model.recenter
    else:  # the GB models, discrete tabulated functions of GBn/GBn2 included, are vectorized
        assert model.sequential_forces == []


def test_unsupported_and_periodic_forces_are_named():
    mol = load_system("alanine_dipeptide_vacuum")
    system = clone(mol.system)
    system.addForce(openmm.CustomNonbondedForce("r"))
    with pytest.raises(ValueError, match="CustomNonbondedForce"):
        OpenMMEnergy(variant(mol, system, "bad"), platform="Reference")
    periodic = clone(mol.system)
    periodic.setDefaultPeriodicBoxVectors(openmm.Vec3(3, 0, 0), openmm.Vec3(0, 3, 0), openmm.Vec3(0, 0, 3))
    next(f for f in periodic.getForces() if isinstance(f, openmm.NonbondedForce)).setNonbondedMethod(
        openmm.NonbondedForce.PME)
    with pytest.raises(ValueError, match=r"NonbondedForce\) uses periodic"):
        build_replicated_system(periodic, 2)
    with pytest.raises(ValueError, match="periodic"):
        SequentialEnergy(variant(mol, periodic, "pme"))

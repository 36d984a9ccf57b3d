"""Test-session settings and the helpers several test files share.

One torch thread: the suite's tensors are small; extra threads only compete with OpenMM's own and with
other processes on a 2-core machine, which slowed training tests many-fold.
"""
import math

import openmm
import torch

from openmm_snf import load_system
from openmm_snf.systems import MolecularSystem
from openmm_snf.weights import log_mean_exp

torch.set_num_threads(1)


# --- flows: blocks far from the identity, importance-sampling estimates against exact answers ----------

def randomize(module, std=0.3, seed=0):
    """Replace all parameters by random values, so blocks are far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def importance_check(snf, target, seed, n=20000, n_sigma=4.0):
    """Check the IS estimates of log Z and <x> against the exact values within n_sigma errors."""
    sample = snf.sample(n, generator=torch.Generator().manual_seed(seed))
    lw = sample.log_weights
    w = torch.exp(lw - lw.max())
    log_z = log_mean_exp(lw)
    se_log_z = float(w.std() / (w.mean() * math.sqrt(n)))
    assert se_log_z < 0.05, f"weights too degenerate for a meaningful test (se={se_log_z})"
    assert abs(log_z - target.log_z) < n_sigma * se_log_z, (log_z, target.log_z, se_log_z)
    wn = w / w.sum()
    x = sample.x.to(torch.float64)
    mean = (wn[:, None] * x).sum(0)
    se_mean = torch.sqrt((wn[:, None] ** 2 * (x - mean) ** 2).sum(0))
    assert ((mean - target.mean).abs() < n_sigma * se_mean).all(), (mean, target.mean, se_mean)
    return log_z, se_log_z


# --- energy: variants of alanine dipeptide with forces the shipped systems lack ----------------------

def variant(mol, system, name):
    return MolecularSystem(name, mol.topology, system, mol.positions, 300.0)


def clone(system):
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))


def gbsaobc_and_cutoff():
    """Native GBSAOBCForce (from the OBC parameters) and CutoffNonPeriodic nonbonded with switching."""
    mol = load_system("alanine_dipeptide_implicit")
    system = clone(mol.system)
    index = next(i for i, f in enumerate(system.getForces()) if isinstance(f, openmm.CustomGBForce))
    custom = system.getForce(index)
    native = openmm.GBSAOBCForce()
    for i in range(custom.getNumParticles()):
        charge, offset_radius, scaled = custom.getParticleParameters(i)
        native.addParticle(charge, offset_radius + 0.009, scaled / offset_radius)
    system.removeForce(index)
    system.addForce(native)
    nonbonded = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    nonbonded.setCutoffDistance(0.6)
    nonbonded.setReactionFieldDielectric(78.3)
    nonbonded.setUseSwitchingFunction(True)
    nonbonded.setSwitchingDistance(0.5)
    return variant(mol, system, "gbsaobc_cutoff")

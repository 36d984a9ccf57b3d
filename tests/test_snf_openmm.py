"""SNFs on shipped OpenMM systems through the energy bridge (CPU platform)."""
import math

import numpy as np
import pytest
import torch

from openmm_snf.coordinates import InternalCoordinateTransform
from openmm_snf.energy.batched import OpenMMEnergy
from openmm_snf.flows import Reshape, build_snf
from openmm_snf.md import MDSettings, run_md
from openmm_snf.systems import load_system
from openmm_snf.train import TrainConfig, Trainer, load_snf


def exact_double_well(n, seed):
    """Quadrature ΔF = F(x > 0) − F(x < 0) in kT and n exact samples (n, 1, 3) nm of the shipped system."""
    grid = np.linspace(-4, 4, 400001)
    p = np.exp(-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid))
    delta_f = -math.log(p[grid > 0].sum() / p[grid < 0].sum())
    cdf = np.cumsum(p) / p.sum()
    rng = np.random.default_rng(seed)
    data = np.zeros((n, 1, 3))
    data[:, 0, 0] = np.interp(rng.random(n), cdf, grid)
    data[:, 0, 1:] = rng.normal(size=(n, 2))
    return delta_f, torch.as_tensor(data)


def test_double_well_through_the_bridge_gives_the_exact_free_energy_difference():
    mol = load_system("double_well")
    energy = OpenMMEnergy(mol, platform="CPU", threads=1)
    delta_f_exact, data = exact_double_well(4000, seed=0)
    assert abs(delta_f_exact + 1.6906) < 1e-3
    torch.manual_seed(0)
    snf = build_snf(3, None, energy, Reshape((1, 3)), n_blocks=3, hidden=(32, 32), stochastic="mc",
                    n_steps=10, step_size=0.3)
    config = TrainConfig(n_iterations=100, batch_size=128, learning_rate=3e-3, ess_every=0)
    history = Trainer(snf, config, data=data, progress=False).train()
    assert history[-1]["loss"] < history[0]["loss"]

    sample = snf.sample(4000, generator=torch.Generator().manual_seed(1))
    assert sample.x.shape == (4000, 1, 3) and sample.ess > 400
    w = torch.softmax(sample.log_weights, 0)
    right = (sample.x[:, 0, 0] > 0).double()
    p_right = float((w * right).sum())
    se_p = float(torch.sqrt((w ** 2 * (right - p_right) ** 2).sum()))
    delta_f = -math.log(p_right / (1 - p_right))
    se = se_p / (p_right * (1 - p_right))
    assert se < 0.3
    assert abs(delta_f - delta_f_exact) < 3 * se, (delta_f, delta_f_exact, se)


@pytest.fixture(scope="module")
def alanine():
    mol = load_system("alanine_dipeptide_vacuum")
    frames = run_md(mol, MDSettings(n_frames=100, steps_per_frame=50, n_replicas=4, equilibration_steps=200),
                    progress=False).reshape(-1, mol.n_atoms, 3)
    return mol, frames


def test_alanine_dipeptide_training_lowers_the_loss_and_checkpoint_reloads_to_same_samples(alanine, tmp_path):
    mol, frames = alanine
    transform = InternalCoordinateTransform.from_system(mol, frames)
    energy = OpenMMEnergy(mol, platform="CPU", threads=1)
    torch.manual_seed(0)
    snf = build_snf(transform.dim, transform.periodic_mask, energy, transform, n_blocks=2, hidden=(64, 64),
                    stochastic="mc", n_steps=3, step_size=0.05, augment=6)
    config = TrainConfig(n_iterations=40, batch_size=64, learning_rate=3e-3, ess_every=0)
    path = tmp_path / "aldp.pt"
    data = torch.as_tensor(frames, dtype=torch.float32)

    def held_out_loss():
        with torch.no_grad():
            return float(snf.forward_kl_loss(data, generator=torch.Generator().manual_seed(2)))

    before = held_out_loss()
    Trainer(snf, config, data=data, checkpoint_path=path, progress=False).train()
    after = held_out_loss()
    assert after < before - 1.0, (before, after)

    sample = snf.sample(32, generator=torch.Generator().manual_seed(1))
    assert sample.x.shape == (32, mol.n_atoms, 3) and torch.isfinite(sample.log_weights).any()
    assert set(sample.acceptance) == {"mc1", "mc2"}
    clone = load_snf(path, OpenMMEnergy(mol, platform="CPU", threads=1),
                     InternalCoordinateTransform.from_system(mol, frames))
    again = clone.sample(32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.x, sample.x)
    torch.testing.assert_close(again.log_weights, sample.log_weights, equal_nan=True)

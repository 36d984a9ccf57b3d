"""Exact path weights of whole SNFs (random flows + stochastic blocks), augmentation, builder."""
import math

import pytest
import torch
from scipy.special import i0e

from openmm_snf.flows import (AffineCoupling, ActNorm, DoubleWellEnergy, GaussianEnergy, InterpolatedEnergy,
                              MarginalizeAuxiliary, MetropolisBlock, OverdampedLangevinBlock, Prior,
                              PulledBackEnergy, SNF, SplineCoupling, UnderdampedLangevinBlock, build_snf,
                              build_snf_from_config)
from conftest import importance_check, randomize


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


TARGET = GaussianEnergy([0.6, -0.4], [[1.4, 0.3], [0.3, 0.7]])
FIRST, SECOND = torch.tensor([True, False]), torch.tensor([False, True])


def test_random_flow_with_mc_and_langevin_gives_exact_log_z_and_mean():
    prior = Prior(2)
    couplings = [randomize(AffineCoupling(m, hidden=(16,)), std=0.2, seed=i)
                 for i, m in enumerate([FIRST, SECOND, FIRST, SECOND])]
    blocks = [couplings[0], couplings[1],
              MetropolisBlock(InterpolatedEnergy(prior.energy, TARGET, 0.5), n_steps=5, step_size=0.4),
              couplings[2],
              OverdampedLangevinBlock(InterpolatedEnergy(prior.energy, TARGET, 0.7), n_steps=5, step_size=0.05),
              couplings[3],
              UnderdampedLangevinBlock(TARGET, n_steps=5, step_size=0.2, friction=2.0),
              MetropolisBlock(TARGET, n_steps=5, step_size=0.4)]
    importance_check(SNF(prior, blocks, TARGET), TARGET, seed=21)


def test_spline_flow_with_langevin_gives_exact_log_z():
    prior = Prior(2)
    blocks = [randomize(SplineCoupling(FIRST, hidden=(16,), n_bins=6, bound=4.0), std=0.2, seed=1),
              OverdampedLangevinBlock(InterpolatedEnergy(prior.energy, TARGET, 0.5), n_steps=5, step_size=0.05),
              randomize(SplineCoupling(SECOND, hidden=(16,), n_bins=6, bound=4.0), std=0.2, seed=2),
              MetropolisBlock(TARGET, n_steps=5, step_size=0.4)]
    importance_check(SNF(prior, blocks, TARGET), TARGET, seed=22)


class TorusTarget(torch.nn.Module):
    """u(θ, x) = −κ cos(θ − θ₀) + (x − m)²/(2 s²) on [−π, π) × R, with exact log Z and mean."""

    def __init__(self, kappa=2.0, theta0=1.0, m=0.3, s=0.8):
        super().__init__()
        self.kappa, self.theta0, self.m, self.s = kappa, theta0, m, s
        self.log_z = math.log(2 * math.pi * i0e(kappa)) + kappa + 0.5 * math.log(2 * math.pi * s * s)

    def forward(self, y):
        return -self.kappa * torch.cos(y[:, 0] - self.theta0) + (y[:, 1] - self.m) ** 2 / (2 * self.s ** 2)


def test_periodic_dims_with_circular_splines_and_wrapped_moves_give_exact_log_z():
    periodic = torch.tensor([True, False])
    target = TorusTarget()
    prior = Prior(2, periodic)
    blocks = [randomize(SplineCoupling(FIRST, periodic, hidden=(16,), n_bins=5), std=0.3, seed=3),
              randomize(AffineCoupling(SECOND, periodic, hidden=(16,)), std=0.2, seed=4),
              MetropolisBlock(InterpolatedEnergy(prior.energy, target, 0.5), n_steps=5, step_size=0.5,
                              periodic_mask=periodic),
              OverdampedLangevinBlock(target, n_steps=5, step_size=0.03, periodic_mask=periodic)]
    sample = SNF(prior, blocks, target).sample(N_TORUS, generator=torch.Generator().manual_seed(5))
    assert (sample.x[:, 0].abs() <= math.pi).all()
    lw = sample.log_weights
    w = torch.exp(lw - lw.max())
    log_z = float(torch.logsumexp(lw, 0) - math.log(N_TORUS))
    se = float(w.std() / (w.mean() * math.sqrt(N_TORUS)))
    assert se < 0.05 and abs(log_z - target.log_z) < 4 * se, (log_z, target.log_z, se)
    # circular mean of θ is θ₀
    wn = w / w.sum()
    c, s = (wn * torch.cos(sample.x[:, 0])).sum(), (wn * torch.sin(sample.x[:, 0])).sum()
    assert abs(math.atan2(float(s), float(c)) - target.theta0) < 0.05


N_TORUS = 20000


def test_augmented_momenta_give_exact_weights_for_the_configuration():
    prior = Prior(4)
    q_mask = torch.tensor([True, True, False, False])
    aux = MarginalizeAuxiliary(2)
    joint = PulledBackEnergy([aux], TARGET)
    blocks = [randomize(AffineCoupling(~q_mask, hidden=(16,)), std=0.2, seed=5),
              randomize(AffineCoupling(q_mask, hidden=(16,)), std=0.2, seed=6),
              MetropolisBlock(InterpolatedEnergy(prior.energy, joint, 0.5), n_steps=5, step_size=0.4),
              randomize(AffineCoupling(~q_mask, hidden=(16,)), std=0.2, seed=7),
              UnderdampedLangevinBlock(joint, n_steps=5, step_size=0.2),
              aux]
    importance_check(SNF(prior, blocks, TARGET), TARGET, seed=23)


def test_stochastic_blocks_before_a_fixed_transform_sample_the_pulled_back_energy():
    """The IC-transform situation: moves in latent space on u(T(y)) − log|det J_T|."""
    prior = Prior(2)
    transform = randomize(AffineCoupling(SECOND, hidden=(16,)), std=0.3, seed=8)
    latent = PulledBackEnergy([transform], TARGET)
    blocks = [randomize(AffineCoupling(FIRST, hidden=(16,)), std=0.2, seed=9),
              MetropolisBlock(InterpolatedEnergy(prior.energy, latent, 0.5), n_steps=5, step_size=0.4),
              OverdampedLangevinBlock(latent, n_steps=5, step_size=0.05),
              transform]
    importance_check(SNF(prior, blocks, TARGET), TARGET, seed=24)


def test_log_likelihood_is_exact_for_deterministic_flows():
    norm = ActNorm(2)
    norm.initialize(torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 0.0]]))
    snf = SNF(Prior(2), [norm], TARGET)
    x = torch.randn(5, 2)
    mean, std = norm.shift.detach(), torch.exp(norm.log_scale.detach())
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(-1)
    torch.testing.assert_close(snf.log_likelihood(x), expected)


def test_sampling_is_reproducible_with_a_generator_and_reports_acceptance():
    snf = build_snf(2, None, DoubleWellEnergy(), n_blocks=2, n_steps=5, stochastic="mc")
    a = snf.sample(50, generator=torch.Generator().manual_seed(3))
    b = snf.sample(50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.log_weights, b.log_weights)
    assert a.log_weights.dtype == torch.float64 and a.target_energy.shape == (50,)
    assert set(a.acceptance) == {"mc1", "mc2"} and all(0 < r <= 1 for r in a.acceptance.values())
    assert 1 <= a.ess <= 50



def test_acceptance_rates_are_named_by_block_kind_and_ordinal_not_position():
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2))
    blocks = [MetropolisBlock(energy, n_steps=2), AffineCoupling(torch.tensor([True, False]), None, (8,)),
              OverdampedLangevinBlock(energy, n_steps=2), MetropolisBlock(energy, n_steps=2)]
    snf = SNF(Prior(2), blocks, energy)
    assert list(snf.sample(4).acceptance) == ["mc1", "langevin1", "mc2"]

@pytest.mark.parametrize("flow", ["realnvp", "spline"])
@pytest.mark.parametrize("stochastic", ["mc", "mala", "langevin", "underdamped", None])
def test_builder_layouts_rebuild_from_config(flow, stochastic):
    periodic = [True, False, False]
    target = lambda x: (x[:, 1:] ** 2).sum(-1) - torch.cos(x[:, 0])  # noqa: E731
    snf = build_snf(3, periodic, target, n_blocks=2, flow=flow, stochastic=stochastic, augment=2,
                    hidden=(8,), n_steps=2, step_size=0.05)
    assert isinstance(snf.blocks[-1], MarginalizeAuxiliary)
    clone = build_snf_from_config(snf.config, target)
    clone.load_state_dict(snf.state_dict())
    a = snf.sample(7, generator=torch.Generator().manual_seed(0))
    b = clone.sample(7, generator=torch.Generator().manual_seed(0))
    assert a.x.shape == (7, 3)
    torch.testing.assert_close(a.log_weights, b.log_weights)
    assert torch.isfinite(snf.log_likelihood(a.x, generator=torch.Generator().manual_seed(1))).all()


def test_builder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="flow must be"):
        build_snf(2, None, TARGET, flow="glow")
    with pytest.raises(ValueError, match="lambdas"):
        build_snf(2, None, TARGET, n_blocks=3, lambdas=[0.5, 1.0])
    with pytest.raises(ValueError, match="periodic_mask"):
        build_snf(2, [True], TARGET)
    with pytest.raises(ValueError, match="invalid SNF config"):
        build_snf_from_config({"n_blocks": 2}, TARGET)

"""Invariants of every deterministic block (parametrized), spline details, and single stochastic blocks."""
import math

import numpy as np
import pytest
import torch

from openmm_snf.flows import (ActNorm, AffineCoupling, GaussianEnergy, InterpolatedEnergy, MALABlock,
                              MetropolisBlock, OverdampedLangevinBlock, Permute, Prior, SNF, SplineCoupling,
                              UnderdampedLangevinBlock, rq_spline, wrap_angle)
from openmm_snf.flows.anneal import annealed
from openmm_snf.flows.builder import build_snf, build_snf_from_config
from openmm_snf.weights import kish_ess

from conftest import importance_check, randomize

DIM = 4
PERIODIC = torch.tensor([False, True, False, True])
HALF = torch.tensor([True, True, False, False])
ALTERNATE = torch.tensor([True, False, True, False])


def inputs(periodic, n=6, spread=1.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64) * spread
    if periodic is not None:
        angles = (torch.rand(n, DIM, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi * 0.98
        x = torch.where(periodic, angles, x)
    return x


def actnorm():
    block = ActNorm(DIM, PERIODIC)
    block.initialize(torch.randn(100, DIM, generator=torch.Generator().manual_seed(3)) * 2 + 1)
    return block


BLOCKS = {
    "affine": (lambda: AffineCoupling(HALF, None, hidden=(16, 16)), None),
    "affine_periodic": (lambda: AffineCoupling(ALTERNATE, PERIODIC, hidden=(16, 16)), PERIODIC),
    "affine_periodic_cond": (lambda: AffineCoupling(~ALTERNATE, PERIODIC, hidden=(16,)), PERIODIC),
    "spline": (lambda: SplineCoupling(HALF, None, hidden=(16, 16), n_bins=6, bound=2.0), None),
    "spline_periodic": (lambda: SplineCoupling(ALTERNATE, PERIODIC, hidden=(16, 16), n_bins=5), PERIODIC),
    "spline_mixed": (lambda: SplineCoupling(HALF, PERIODIC, hidden=(16,), n_bins=4, bound=2.0), PERIODIC),
    "permute": (lambda: Permute([2, 0, 3, 1]), None),
    "swap": (lambda: Permute.swap(DIM), None),
    "actnorm": (actnorm, PERIODIC),
    "inverse_of_affine": (lambda: AffineCoupling(HALF, None, hidden=(16,)).inv, None),
}


@pytest.fixture(params=sorted(BLOCKS))
def block_case(request):
    factory, periodic = BLOCKS[request.param]
    block = randomize(factory()).double()
    return block, periodic


def test_round_trip_and_logdets_cancel(block_case):
    block, periodic = block_case
    x = inputs(periodic)
    y, ld_forward = block(x)
    x_back, ld_inverse = block.inverse(y)
    assert y.shape == x.shape and ld_forward.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld_forward, -ld_inverse, atol=1e-9, rtol=0)
    assert not torch.allclose(y, x)


def test_logdet_matches_autograd_jacobian(block_case):
    block, periodic = block_case
    x = inputs(periodic, n=3)
    for direction in ("forward", "inverse"):
        fn = block if direction == "forward" else block.inverse
        _, logdet = fn(x)
        jac = torch.autograd.functional.jacobian(lambda t: fn(t)[0], x)
        for b in range(x.shape[0]):
            expected = torch.linalg.slogdet(jac[b, :, b, :]).logabsdet
            torch.testing.assert_close(logdet[b], expected, atol=1e-8, rtol=1e-8)


def test_periodic_dims_stay_on_the_circle(block_case):
    block, periodic = block_case
    if periodic is None or isinstance(block, Permute):
        pytest.skip("no periodic dims")
    y, _ = block(inputs(periodic, n=200, spread=3.0))
    assert (y[:, periodic] >= -math.pi).all() and (y[:, periodic] < math.pi + 1e-12).all()


def test_fresh_couplings_are_identity():
    x = inputs(PERIODIC)
    for block in (AffineCoupling(HALF, PERIODIC), SplineCoupling(ALTERNATE, PERIODIC)):
        y, logdet = block.double()(x)
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-6, rtol=0)


def test_spline_is_identity_outside_bound_and_monotone_inside():
    gen = torch.Generator().manual_seed(0)
    widths, heights = torch.randn(1, 7, generator=gen).double(), torch.randn(1, 7, generator=gen).double()
    derivs = torch.randn(1, 6, generator=gen).double()
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)[:, None]
    y, logdet = rq_spline(x, widths.expand(801, 1, 7), heights.expand(801, 1, 7), derivs.expand(801, 1, 6),
                          bound=3.0)
    outside = x.abs() > 3
    torch.testing.assert_close(y[outside], x[outside])
    assert (logdet[outside] == 0).all()
    assert (torch.diff(y[:, 0]) > 0).all()


def test_circular_spline_matches_ends():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(2, 1, 5, generator=gen).double() for _ in range(3)]
    x = torch.tensor([[-math.pi], [math.pi - 1e-12]], dtype=torch.float64)
    y, logdet = rq_spline(x, *params, circular=True)
    torch.testing.assert_close(wrap_angle(y[0]), wrap_angle(y[1] + 1e-12), atol=1e-9, rtol=0)


def test_block_validation_messages():
    with pytest.raises(ValueError, match="some but not all"):
        AffineCoupling(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expects"):
        AffineCoupling(HALF)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="permutation"):
        Permute([0, 0, 1])
    with pytest.raises(ValueError, match="lambda"):
        InterpolatedEnergy(None, None, 1.5)


# --- single stochastic blocks: exact weights on a Gaussian with known normalizer -----------------

TARGET = GaussianEnergy([0.6, -0.4], [[1.4, 0.3], [0.3, 0.7]])


STOCHASTIC = {
    "mc": lambda e: MetropolisBlock(e, n_steps=10, step_size=0.5),
    "mala": lambda e: MALABlock(e, n_steps=10, step_size=0.05),
    "overdamped": lambda e: OverdampedLangevinBlock(e, n_steps=10, step_size=0.05),
    "underdamped": lambda e: UnderdampedLangevinBlock(e, n_steps=10, step_size=0.2, friction=2.0),
}


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_single_stochastic_block_gives_exact_weights(kind, lam):
    torch.set_default_dtype(torch.float64)
    try:
        prior = Prior(2)
        block = STOCHASTIC[kind](InterpolatedEnergy(prior.energy, TARGET, lam))
        snf = SNF(prior, [block], TARGET)
        importance_check(snf, TARGET, seed=11)
    finally:
        torch.set_default_dtype(torch.float32)


def test_dropping_the_path_term_is_detected():
    """Negative control: the same check fails when a Langevin block's ΔS is ignored."""
    torch.set_default_dtype(torch.float64)
    try:
        prior = Prior(2)
        block = OverdampedLangevinBlock(InterpolatedEnergy(prior.energy, TARGET, 1.0), n_steps=10, step_size=0.05)
        original = block._run
        block._run = lambda y, gen: (original(y, gen)[0], torch.zeros(y.shape[0]))
        with pytest.raises(AssertionError):
            importance_check(SNF(prior, [block], TARGET), TARGET, seed=11)
    finally:
        torch.set_default_dtype(torch.float32)


# --- Metropolis at lambda = 1 leaves the target invariant (1-D, exact input samples) -------------

def quartic(x):
    return 0.25 * x[:, 0] ** 4 - x[:, 0] ** 2 + 0.3 * x[:, 0]


def exact_quartic_samples(n, seed):
    grid = np.linspace(-4, 4, 200001)
    p = np.exp(-(0.25 * grid ** 4 - grid ** 2 + 0.3 * grid))
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    u = np.random.default_rng(seed).random(n)
    return torch.as_tensor(np.interp(u, cdf, grid), dtype=torch.float64)[:, None], grid, p / p.sum()


@pytest.mark.parametrize("block", [MetropolisBlock(quartic, n_steps=3, step_size=1.0),
                                   MALABlock(quartic, n_steps=3, step_size=0.3)], ids=["mc", "mala"])
def test_metropolis_preserves_target_and_detailed_balance(block):
    n = 40000
    x_in, grid, p = exact_quartic_samples(n, seed=5)
    x_out, delta_s = block(x_in, generator=torch.Generator().manual_seed(6))
    assert 0.2 < block.last_acceptance < 0.9
    torch.testing.assert_close(delta_s, quartic(x_out) - quartic(x_in))
    a, b = x_in[:, 0], x_out[:, 0]
    for k in (1, 2, 3):
        exact = float((p * grid ** k).sum())
        est, se = float((b ** k).mean()), float((b ** k).std() / math.sqrt(n))
        assert abs(est - exact) < 4 * se, (k, est, exact, se)
    # Detailed balance: the pair (in, out) is exchangeable, so E[f(in) g(out)] = E[g(in) f(out)].
    d = a * b ** 2 - a ** 2 * b
    assert abs(float(d.mean())) < 4 * float(d.std() / math.sqrt(n))
    assert float((a != b).double().mean()) > 0.3


def test_metropolis_chains_leave_states_of_infinite_energy():
    """A chain that starts in a clash (u = +inf) accepts any proposal of finite energy and never
    accepts a non-finite one."""
    def walled(x):
        u = 0.5 * x[:, 0] ** 2
        return torch.where(x[:, 0] > 1.0, torch.full_like(u, math.inf), torch.where(x[:, 0] < -3.0, u * math.nan, u))

    start = torch.full((500, 1), 2.0, dtype=torch.float64)
    out, _ = MetropolisBlock(walled, n_steps=5, step_size=1.5)(start, generator=torch.Generator().manual_seed(0))
    moved = out[:, 0] != 2.0
    assert moved.float().mean() > 0.5
    assert torch.isfinite(walled(out[moved])).all()


def test_metropolis_gradient_flows_through_the_end_energies_only():
    """With autograd the output is the chain's state (same draws as without) with an identity Jacobian,
    and ΔS = u(out) - u(in) has gradient ∇u(out) - ∇u(in): what differentiating every step gives."""
    x = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64)[:, None]
    block = MetropolisBlock(quartic, n_steps=5, step_size=0.8)
    with torch.no_grad():
        plain, plain_ds = block(x, generator=torch.Generator().manual_seed(3))
    leaf = x.clone().requires_grad_(True)
    out, delta_s = block(leaf, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.detach(), plain) and torch.equal(delta_s.detach(), plain_ds)
    weights = torch.arange(1.0, 8.0, dtype=torch.float64)[:, None]
    (grad,) = torch.autograd.grad((weights * out).sum() + delta_s.sum(), leaf)

    def du(z):
        return 0.25 * 4 * z ** 3 - 2 * z + 0.3

    assert (plain != x).any()  # some moves were accepted
    torch.testing.assert_close(grad, weights + du(plain) - du(x))


# --- annealed refinement of a flow: exact weights, fewer wasted samples -------------------------

@pytest.mark.parametrize("kernel, step_size", [("mc", 0.5), ("mala", 0.05)])
def test_annealed_flow_gives_exact_weights_and_a_larger_ess(kernel, step_size):
    torch.set_default_dtype(torch.float64)
    try:
        target = GaussianEnergy([2.0, -1.5], [[0.3, 0.1], [0.1, 0.2]])  # far from the flow's output
        flow = SNF(Prior(2), [randomize(AffineCoupling(torch.tensor([True, False]), None, hidden=(8,)), std=0.2),
                              randomize(AffineCoupling(torch.tensor([False, True]), None, hidden=(8,)), std=0.2,
                                        seed=1)], target)
        refined = annealed(flow, 20, n_steps=3, step_size=step_size, kernel=kernel)
        assert len(refined.blocks) == 3 and refined.blocks[-1] is flow.blocks[-1]  # the flow is shared
        importance_check(refined, target, seed=21)
        generator = torch.Generator().manual_seed(4)
        ess_flow = kish_ess(flow.sample(4000, generator=generator).log_weights)
        ess_refined = kish_ess(refined.sample(4000, generator=generator).log_weights)
        assert ess_refined > 2 * ess_flow, (ess_flow, ess_refined)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("kernel, step_size", [("mc", 0.5), ("mala", 0.05)])
def test_annealing_over_periodic_dims_gives_exact_weights(kernel, step_size):
    """Torsions: the chains step on the circle. log Z and the circular means <cos(x1)>, <cos(x3 - 1)> of a
    product of Gaussians and von Mises densities match their closed forms (Bessel I0, I1) within 4 sigma."""
    from scipy.special import i0, i1

    def target(x):
        return 0.5 * ((x[:, 0] - 1) ** 2 + 2 * x[:, 2] ** 2) - torch.cos(x[:, 1]) - 2 * torch.cos(x[:, 3] - 1)

    log_z = math.log(math.sqrt(2 * math.pi) * math.sqrt(math.pi) * 2 * math.pi * i0(1) * 2 * math.pi * i0(2))
    torch.set_default_dtype(torch.float64)
    try:
        flow = SNF(Prior(DIM, PERIODIC), [randomize(AffineCoupling(ALTERNATE, PERIODIC, hidden=(8,)), std=0.2),
                                          randomize(AffineCoupling(~ALTERNATE, PERIODIC, hidden=(8,)), std=0.2,
                                                    seed=1)], target)
        n = 20000
        batch = annealed(flow, 10, n_steps=3, step_size=step_size, kernel=kernel).sample(
            n, generator=torch.Generator().manual_seed(3))
        log_w = batch.log_weights
        w = torch.exp(log_w - log_w.max())
        estimate = float(torch.logsumexp(log_w, 0) - math.log(n))
        se = float(w.std() / (w.mean() * math.sqrt(n)))
        assert kish_ess(log_w) > 0.1 * n and abs(estimate - log_z) < 4 * se, (estimate, log_z, se)
        wn = w / w.sum()
        for values, exact in ((torch.cos(batch.x[:, 1]), i1(1) / i0(1)), (torch.cos(batch.x[:, 3] - 1), i1(2) / i0(2))):
            mean = float((wn * values).sum())
            se_mean = float(torch.sqrt((wn ** 2 * (values - mean) ** 2).sum()))
            assert abs(mean - exact) < 4 * se_mean, (mean, exact, se_mean)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("kernel, step_size", [("mc", 0.5), ("mala", 0.05)])
def test_annealing_stages_run_as_one_block_give_the_samples_and_weights_of_separate_blocks(kernel, step_size):
    # AnnealingStages reuses each chain's energy terms across stages; separate blocks recompute them
    def target(x):
        return 0.5 * ((x[:, 0] - 1) ** 2 + 2 * x[:, 2] ** 2) - torch.cos(x[:, 1]) - 2 * torch.cos(x[:, 3] - 1)

    torch.set_default_dtype(torch.float64)
    try:
        flow = SNF(Prior(DIM, PERIODIC), [randomize(AffineCoupling(ALTERNATE, PERIODIC, hidden=(8,)), std=0.2),
                                          randomize(AffineCoupling(~ALTERNATE, PERIODIC, hidden=(8,)), std=0.2,
                                                    seed=1)], target)
        fused = annealed(flow, 6, n_steps=3, step_size=step_size, kernel=kernel)
        separate = SNF(flow.prior, list(fused.blocks[0].stages) + list(flow.blocks), target)
        a = fused.sample(300, generator=torch.Generator().manual_seed(5))
        b = separate.sample(300, generator=torch.Generator().manual_seed(5))
        exact = dict(rtol=0, atol=0) if kernel == "mc" else dict(rtol=1e-12, atol=1e-12)  # MALA mixes ∇ terms
        torch.testing.assert_close(a.x, b.x, **exact)
        torch.testing.assert_close(a.log_weights, b.log_weights, **exact)
        assert a.acceptance == b.acceptance and list(a.acceptance) == [f"{kernel}{k}" for k in range(1, 7)]
        assert 0 < min(a.acceptance.values()) and max(a.acceptance.values()) < 1
        x = inputs(PERIODIC, n=50)  # the inverse path: the same up to the order in which ΔS terms are summed
        torch.testing.assert_close(fused.log_likelihood(x, generator=torch.Generator().manual_seed(2)),
                                   separate.log_likelihood(x, generator=torch.Generator().manual_seed(2)),
                                   rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_annealing_refuses_stochastic_models_and_bad_settings():
    prior = Prior(2)
    with pytest.raises(ValueError, match="without stochastic blocks"):
        annealed(SNF(prior, [MetropolisBlock(TARGET)], TARGET), 5)
    with pytest.raises(ValueError, match="n_stages"):
        annealed(SNF(prior, [Permute.swap(2)], TARGET), 0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        annealed(SNF(prior, [Permute.swap(2)], TARGET), 5, kernel="hmc")


def test_an_annealed_model_is_not_saved_as_its_flow(tmp_path):
    from openmm_snf.train import save_checkpoint
    flow = build_snf(2, None, TARGET, n_blocks=1, hidden=(8,))
    save_checkpoint(tmp_path / "flow.pt", flow)
    with pytest.raises(ValueError, match="not made by build_snf"):
        save_checkpoint(tmp_path / "annealed.pt", annealed(flow, 3))


@pytest.mark.parametrize("differentiable", [False, True])
def test_langevin_forces_enter_the_gradient_only_when_asked(differentiable):
    """One overdamped step y' = y - eps grad u(y) + sqrt(2 eps) eta on u = x^T P x / 2: dy'/dy is
    I - eps P with differentiable forces, I with constant ones (the weights are exact either way)."""
    precision = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    energy = GaussianEnergy([0.0, 0.0], torch.linalg.inv(precision))
    eps = 0.1
    block = OverdampedLangevinBlock(energy, n_steps=1, step_size=eps, differentiable_forces=differentiable)
    y = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    out, _ = block(y, generator=torch.Generator().manual_seed(0))
    jacobian = torch.stack([torch.autograd.grad(out[0, k], y, retain_graph=True)[0][0] for k in range(2)])
    expected = torch.eye(2, dtype=torch.float64) - (eps * precision if differentiable else 0.0)
    torch.testing.assert_close(jacobian, expected)


def _coupling_masks(snf):
    return [block.ordinary_idx.tolist() + block.periodic_idx.tolist() for block in snf.blocks
            if isinstance(block, AffineCoupling)]


def test_alternating_masks_let_torsions_condition_on_torsions():
    dim, periodic = 12, [False] * 6 + [True] * 6          # an IC layout: bonds/angles, then torsions
    snf = build_snf(dim, periodic, GaussianEnergy(torch.zeros(dim), torch.eye(dim)), n_blocks=3,
                    stochastic=None)
    masks = _coupling_masks(snf)
    assert len(masks) == 6
    for pair in range(3):
        first, second = sorted(masks[2 * pair]), sorted(masks[2 * pair + 1])
        assert sorted(first + second) == list(range(dim))           # each pair transforms every dim once
        for part in (first, second):                               # torsions on both sides, 3 and 3
            assert sum(periodic[i] for i in part) == 3
    assert sorted(masks[0]) != sorted(masks[2])                     # consecutive pairs split differently
    halves = build_snf(dim, periodic, GaussianEnergy(torch.zeros(dim), torch.eye(dim)), n_blocks=3,
                       stochastic=None, masks="halves")
    assert all(sorted(m) in (list(range(6)), list(range(6, 12))) for m in _coupling_masks(halves))


def test_models_saved_before_the_masks_option_rebuild_with_halves(tmp_path):
    from openmm_snf.train import load_snf, save_checkpoint
    dim = 8
    energy = GaussianEnergy(torch.zeros(dim), torch.eye(dim))
    old = build_snf(dim, [False] * 4 + [True] * 4, energy, n_blocks=2, stochastic=None, masks="halves")
    save_checkpoint(tmp_path / "old.pt", old)
    saved = torch.load(tmp_path / "old.pt", weights_only=False)
    del saved["snf_config"]["masks"]                     # as written before the option existed
    torch.save(saved, tmp_path / "old.pt")
    rebuilt = load_snf(tmp_path / "old.pt", energy)
    assert _coupling_masks(rebuilt) == _coupling_masks(old)
    assert _coupling_masks(build_snf_from_config(old.config, energy)) == _coupling_masks(old)

"""The batched bridge against the single-Context Reference loop: energies, forces, gradients, bad samples.

Tolerances (kJ/mol and relative to the largest force component of the batch):
  Reference platform, float64 input: energies 1e-3 kJ/mol, forces 1e-4 relative (measured ~1e-12);
  CPU platform (single-precision pair forces): energies 1e-3 kJ/mol (energies are computed in float64
  from the parameters on every platform), forces 1e-4 relative (measured ~2e-6).
"""
import pytest
import torch

from openmm_snf import load_system, shipped_systems
from openmm_snf.energy import BadSample, OpenMMEnergy, SequentialEnergy
from openmm_snf.energy.platforms import available_platforms

ENERGY_TOL_KJ = 1e-3
FORCE_TOL_REL = 1e-4


@pytest.fixture(scope="module", params=shipped_systems())
def mol(request):
    return load_system(request.param)


def perturbed(mol, batch, scale=0.02, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, mol.n_atoms, 3, generator=generator, dtype=torch.float64)
    return torch.as_tensor(mol.positions)[None] + scale * noise


def assert_matches(model, reference, x):
    u, f = model.energy_and_forces(x)
    u_ref, f_ref = reference.energy_and_forces(x)
    assert u.shape == (len(x),) and f.shape == x.shape
    assert u.dtype == x.dtype and f.dtype == x.dtype
    assert torch.all((u - u_ref).abs() * model.kT < ENERGY_TOL_KJ)
    assert torch.all((f - f_ref).abs() <= FORCE_TOL_REL * f_ref.abs().max())
    assert torch.all(model.last_flags == 0)


@pytest.mark.parametrize("forces_from", ["compiled", "torch", "openmm"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_batched_matches_sequential_reference(mol, platform, forces_from):
    model = OpenMMEnergy(mol, platform=platform, chunk_size=8, loop_below=0, forces_from=forces_from)
    assert model.forces_from == forces_from
    reference = SequentialEnergy(mol, platform="Reference")
    assert_matches(model, reference, perturbed(mol, 13))  # odd size, above the chunk size
    assert_matches(model, reference, perturbed(mol, 1, seed=1))
    tiny_batches_loop = OpenMMEnergy(mol, platform=platform, forces_from=forces_from, loop_below=16)
    assert_matches(tiny_batches_loop, reference, perturbed(mol, 3, seed=2))
    assert torch.allclose(model.forces(perturbed(mol, 5)), reference.forces(perturbed(mol, 5)),
                          rtol=0, atol=FORCE_TOL_REL * reference.forces(perturbed(mol, 5)).abs().max())


def test_large_batches_are_chunked_and_routes_are_validated():
    mol = load_system("alanine_dipeptide_implicit")
    model = OpenMMEnergy(mol, platform="CPU", forces_from="torch")
    assert model.sequential_forces == [] and "forces from float64 torch terms" in model.describe()
    x = perturbed(mol, 1100, scale=0.01)  # more than two passes of the torch terms (512 samples each)
    u, f = model.energy_and_forces(x)
    u_ref, f_ref = SequentialEnergy(mol, platform="CPU", threads=1).energy_and_forces(x[1020:1030])
    assert torch.all((u[1020:1030] - u_ref).abs() * model.kT < ENERGY_TOL_KJ)
    assert torch.all((f[1020:1030] - f_ref).abs() <= FORCE_TOL_REL * f_ref.abs().max())
    with pytest.raises(ValueError, match="forces_from"):
        OpenMMEnergy(mol, platform="CPU", forces_from="numpy")


@pytest.mark.parametrize("name", ["alanine_dipeptide_vacuum", "alanine_dipeptide_implicit"])
def test_compiled_route_is_the_cpu_default(name):
    mol = load_system(name)
    model = OpenMMEnergy(mol, platform="CPU")
    assert model.forces_from == "compiled" and model.loop_below == 0
    assert model.describe().endswith("forces from the compiled float64 kernel")  # GB included
    x = perturbed(mol, 40)
    reference = SequentialEnergy(mol, platform="Reference")
    assert_matches(model, reference, x)
    f_ref = reference.forces(x)
    assert torch.all((model.forces(x) - f_ref).abs() <= FORCE_TOL_REL * f_ref.abs().max())


def test_energies_are_translation_and_batch_independent():
    mol = load_system("alanine_dipeptide_vacuum")
    model = OpenMMEnergy(mol, platform="Reference", chunk_size=4)
    x = perturbed(mol, 6)
    u, f = model.energy_and_forces(x)
    u_shift, f_shift = model.energy_and_forces(x + torch.tensor([3.0, -40.0, 7.0], dtype=torch.float64))
    assert torch.allclose(u, u_shift, rtol=0, atol=1e-9) and torch.allclose(f, f_shift, rtol=0, atol=1e-8)
    u_single = torch.cat([model.energy_and_forces(x[b:b + 1])[0] for b in range(len(x))])
    assert torch.allclose(u, u_single, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_class", [OpenMMEnergy, SequentialEnergy])
def test_non_contiguous_float32_input(model_class):
    mol = load_system("alanine_dipeptide_vacuum")
    model = model_class(mol, platform="CPU", threads=1)  # one thread: OpenMM's CPU sums in a fixed order
    x = perturbed(mol, 20)
    strided = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # same values, non-contiguous memory
    assert not strided.is_contiguous()
    u, f = model.energy_and_forces(strided)
    u_ref, f_ref = model.energy_and_forces(x)
    assert torch.equal(u, u_ref) and torch.equal(f, f_ref)
    u32, f32 = model.energy_and_forces(x.float())  # evaluated in float64 at the float32 positions
    u64, f64 = model.energy_and_forces(x.float().double())
    assert u32.dtype == f32.dtype == torch.float32
    assert torch.equal(u32, u64.float()) and torch.equal(f32, f64.float())


def test_reduced_units_and_forces_only_path():
    mol = load_system("double_well")  # U/kT = x^4 - 6x^2 - 0.5x + 0.5y^2 + 0.5z^2 exactly
    model = OpenMMEnergy(mol, platform="Reference")
    x = torch.tensor([[[1.3, -0.2, 0.4]], [[-1.7, 0.5, 0.0]], [[0.1, 0.0, 2.0]]], dtype=torch.float64)
    px, py, pz = x[:, 0, 0], x[:, 0, 1], x[:, 0, 2]
    expected = px ** 4 - 6 * px ** 2 - 0.5 * px + 0.5 * py ** 2 + 0.5 * pz ** 2
    u, f = model.energy_and_forces(x)
    assert torch.allclose(u, expected, atol=1e-10)
    grad = torch.stack([4 * px ** 3 - 12 * px - 0.5, py, pz], dim=-1)[:, None, :]
    assert torch.allclose(f, -grad, atol=1e-9)
    assert torch.allclose(model.forces(x), f, atol=0)


def test_temperature_override_scales_reduced_energy():
    mol = load_system("alanine_dipeptide_vacuum")
    x = perturbed(mol, 3)
    hot = OpenMMEnergy(mol, platform="Reference")
    cold = OpenMMEnergy(mol, platform="Reference", temperature=300.0)
    assert torch.allclose(cold(x) * cold.kT, hot(x) * hot.kT, atol=1e-9)
    assert abs(hot.kT / cold.kT - 1000.0 / 300.0) < 1e-12


@pytest.mark.parametrize("forces_from", ["compiled", "torch", "openmm"])
def test_gradcheck_autograd_function(forces_from):
    mol = load_system("alanine_dipeptide_implicit")
    model = OpenMMEnergy(mol, platform="Reference", forces_from=forces_from)
    x = perturbed(mol, 2, scale=0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    u = model(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    assert torch.allclose(grad, -model.energy_and_forces(x.detach())[1], atol=0)


@pytest.mark.parametrize("forces_from", ["compiled", "torch", "openmm"])
def test_bad_samples_are_flagged_and_do_not_change_the_others(forces_from):
    mol = load_system("alanine_dipeptide_vacuum")
    model = OpenMMEnergy(mol, platform="Reference", forces_from=forces_from)
    good = perturbed(mol, 3)
    u_good, f_good = model.energy_and_forces(good)
    exploded = good[0].clone()
    exploded[5] += 1e6                       # one atom far away: out of a replicated copy's range
    nan = good[1].clone()
    nan[3, 1] = float("nan")
    overlap = good[2].clone()
    overlap[0] = overlap[1]                  # two atoms on top of each other
    batch = torch.stack([good[0], exploded, good[1], nan, overlap, good[2]])
    u, f = model.energy_and_forces(batch)
    flags = model.last_flags
    # energies are bit-identical; forces differ only by the rounding of the copy's grid offset
    assert torch.equal(u[[0, 2, 5]], u_good)
    assert torch.allclose(f[[0, 2, 5]], f_good, rtol=0, atol=1e-10 * f_good.abs().max())
    assert flags[[0, 2, 5]].tolist() == [0, 0, 0]
    if forces_from == "openmm":  # copies in one Context: the spread sample is evaluated alone
        assert flags[1] & BadSample.OUT_OF_RANGE
    else:  # no copies, no range: evaluated in the batch
        assert flags[1] == 0
    assert flags[3] & BadSample.NONFINITE_INPUT and torch.isnan(u[3]) and torch.isnan(f[3]).all()
    assert flags[4] & (BadSample.NONFINITE_ENERGY | BadSample.NONFINITE_FORCES)
    # the exploded sample still gets its exact (huge) energy: compare with the plain loop
    u_seq, f_seq = SequentialEnergy(mol).energy_and_forces(exploded[None])
    assert torch.isfinite(u[1]) and u[1] > 1e6
    assert torch.allclose(u[1], u_seq[0], rtol=1e-12) and torch.allclose(f[1], f_seq[0], rtol=1e-9)


def test_a_bug_in_the_batched_path_is_raised_not_retried_sample_by_sample(monkeypatch):
    """Only OpenMM's own failures send a batch to the per-sample loop; an error of the torch or numba
    terms (a bug) reaches the caller instead of becoming a warning and a slowdown."""
    mol = load_system("alanine_dipeptide_vacuum")
    model = OpenMMEnergy(mol, platform="Reference")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the terms")
    monkeypatch.setattr(model, "_in_batch", broken)
    with pytest.raises(RuntimeError, match="a bug in the terms"):
        model.energy_and_forces(perturbed(mol, 64))


def test_input_validation_messages():
    mol = load_system("alanine_dipeptide_vacuum")
    model = OpenMMEnergy(mol, platform="Reference", per_sample_energies=False)
    with pytest.raises(ValueError, match=r"\(B, 22, 3\)"):
        model.forces(torch.zeros(4, 21, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        model.forces(torch.zeros(1, 22, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="per_sample_energies=False"):
        model.energy_and_forces(perturbed(mol, 1))
    assert model.forces(perturbed(mol, 2)).shape == (2, 22, 3)
    with pytest.raises(ValueError, match="not available"):
        OpenMMEnergy(mol, platform="NoSuchPlatform")
    assert "Reference (double precision)" in model.describe()


cuda = pytest.mark.skipif("CUDA" not in available_platforms() or not torch.cuda.is_available(),
                          reason="needs an OpenMM CUDA platform and a CUDA build of torch")


@cuda
@pytest.mark.parametrize("precision, force_tol", [("mixed", 1e-3), ("double", 1e-8)])
def test_cuda_matches_reference(precision, force_tol):
    mol = load_system("alanine_dipeptide_implicit")
    model = OpenMMEnergy(mol, platform="CUDA", precision=precision)
    assert model.precision == precision
    x = perturbed(mol, 37)
    u, f = model.energy_and_forces(x.cuda())
    u_ref, f_ref = SequentialEnergy(mol).energy_and_forces(x)
    assert u.is_cuda and f.is_cuda
    assert torch.all((u.cpu() - u_ref).abs() * model.kT < ENERGY_TOL_KJ)
    assert torch.all((f.cpu() - f_ref).abs() <= force_tol * f_ref.abs().max())

"""Trainer: losses go down, non-finite steps are skipped, checkpoints are atomic and resume exactly."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_snf.flows import DoubleWellEnergy, build_snf
from openmm_snf.train import CheckpointError, TrainConfig, Trainer, learning_rate_at, load_checkpoint, load_snf


def double_well_data(n=2000, seed=0):
    """Exact-ish samples of the double well: x by inverse CDF on a grid, y ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3.5, 3.5, 20001, dtype=torch.float64)
    p = torch.exp(-DoubleWellEnergy()(torch.stack([grid, torch.zeros_like(grid)], 1)))
    cdf = torch.cumsum(p, 0) / p.sum()
    x = grid[torch.searchsorted(cdf, torch.rand(n, generator=gen, dtype=torch.float64)).clamp(max=20000)]
    return torch.stack([x, torch.randn(n, generator=gen, dtype=torch.float64)], 1).float()


def small_snf(stochastic="mc", seed=0):
    torch.manual_seed(seed)
    step_size = 0.3 if stochastic == "mc" else 0.005
    return build_snf(2, None, DoubleWellEnergy(), n_blocks=2, hidden=(32, 32), stochastic=stochastic,
                     n_steps=5, step_size=step_size)


def mean_loss(history, key, n=20):
    values = [m[key] for m in history if key in m]
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_forward_kl_training_lowers_the_loss():
    snf = small_snf()
    cfg = TrainConfig(n_iterations=80, batch_size=128, learning_rate=3e-3, ess_every=0)
    history = Trainer(snf, cfg, data=double_well_data(), progress=False).train()
    first, last = mean_loss(history, "loss_forward")
    assert last < first - 0.3, (first, last)


def test_reverse_kl_training_lowers_the_loss_and_reports_ess_and_acceptance():
    snf = small_snf()
    cfg = TrainConfig(n_iterations=80, batch_size=128, learning_rate=3e-3, weight_forward=0.0,
                      weight_reverse=1.0)
    history = Trainer(snf, cfg, progress=False).train()
    first, last = mean_loss(history, "loss_reverse")
    assert last < first - 0.3, (first, last)
    assert 0 < history[-1]["ess_fraction"] <= 1
    assert set(history[-1]["acceptance"]) == {"mc1", "mc2"}


class FlakyEnergy(torch.nn.Module):
    """The double well, but NaN on chosen calls (counted per forward)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.calls, self.bad_calls, self.inner = 0, set(bad_calls), DoubleWellEnergy()

    def forward(self, x):
        self.calls += 1
        u = self.inner(x)
        return u * float("nan") if self.calls in self.bad_calls else u


def test_non_finite_steps_are_skipped_and_counted():
    energy = FlakyEnergy(bad_calls={2, 3})
    torch.manual_seed(0)
    snf = build_snf(2, None, energy, n_blocks=1, hidden=(8,), stochastic=None)
    cfg = TrainConfig(n_iterations=4, batch_size=16, weight_forward=0.0, weight_reverse=1.0)
    trainer = Trainer(snf, cfg, progress=False)
    before = [p.detach().clone() for p in snf.parameters()]
    trainer.step()
    after_good = [p.detach().clone() for p in snf.parameters()]
    metrics = [trainer.step(), trainer.step()]
    assert [m["skipped"] for m in metrics] == [True, True] and trainer.n_skipped == 2
    for p, q in zip(after_good, snf.parameters()):
        torch.testing.assert_close(p, q.detach())
    assert any(not torch.equal(p, q) for p, q in zip(before, after_good))
    assert trainer.step()["skipped"] is False


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(n_iterations=8, batch_size=32, weight_forward=1.0, weight_reverse=0.5, seed=3,
                      checkpoint_every=0, lr_schedule="cosine")
    data = double_well_data(500)
    straight = small_snf(seed=1)
    Trainer(straight, cfg, data=data, progress=False).train()

    resumed = small_snf(seed=1)
    path, log = tmp_path / "ckpt.pt", tmp_path / "metrics.jsonl"
    Trainer(resumed, cfg, data=data, checkpoint_path=path, metrics_path=log, progress=False).train(4)
    assert load_checkpoint(path)["iteration"] == 4
    fresh = small_snf(seed=99)  # different init: everything must come from the checkpoint
    trainer = Trainer(fresh, cfg, data=data, checkpoint_path=path, metrics_path=log, progress=False)
    assert trainer.iteration == 4
    trainer.train()
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "skipped", "n_skipped", "loss_forward", "loss_reverse"} <= set(lines[0])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_loaded_model_reproduces_samples(tmp_path):
    snf = small_snf(stochastic="langevin")
    cfg = TrainConfig(n_iterations=3, batch_size=16, checkpoint_every=2)
    Trainer(snf, cfg, data=double_well_data(100), checkpoint_path=tmp_path / "c.pt", progress=False).train()
    clone = load_snf(tmp_path / "c.pt", DoubleWellEnergy())
    a = snf.sample(20, generator=torch.Generator().manual_seed(7))
    b = clone.sample(20, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(a.log_weights).all()
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.log_weights, b.log_weights)


def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="warm")
    with pytest.raises(ValueError, match="needs data"):
        Trainer(small_snf(), TrainConfig(), progress=False)
    cfg = TrainConfig(n_iterations=11, learning_rate=1.0, lr_schedule="exponential", lr_final_factor=0.01)
    assert learning_rate_at(cfg, 0) == 1.0 and abs(learning_rate_at(cfg, 10) - 0.01) < 1e-12
    with pytest.raises(CheckpointError):
        load_checkpoint("/nonexistent/ckpt.pt")


def validating_config(**changes):
    values = dict(n_iterations=12, batch_size=32, learning_rate=3e-3, ess_every=0, validation_fraction=0.1,
                  validate_every=4, checkpoint_every=0)
    return TrainConfig(**{**values, **changes})


def test_validation_frames_are_never_trained_on():
    data = double_well_data(200)
    snf = small_snf()
    trainer = Trainer(snf, validating_config(n_iterations=8), data=data, progress=False)
    torch.testing.assert_close(trainer.val_data, data[-20:])
    torch.testing.assert_close(trainer.data, data[:-20])
    seen = {True: [], False: []}
    loss = snf.forward_kl_loss

    def recording(x, **kwargs):
        seen[snf.training].append(x)
        return loss(x, **kwargs)

    snf.forward_kl_loss = recording
    trainer.train()
    trained, validated = torch.cat(seen[True]), torch.cat(seen[False])
    assert len(trained) == 8 * 32 and torch.cdist(trained, data[-20:]).min() > 0
    torch.testing.assert_close(validated, torch.cat([data[-20:]] * 2))  # two validations, all held-out frames


def test_val_loss_is_logged_and_best_pt_holds_the_best_model(tmp_path):
    data = double_well_data(300)
    path, log = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    cfg = validating_config(batch_size=8)  # 30 held-out frames: 4 chunks
    trainer = Trainer(small_snf(), cfg, data=data, checkpoint_path=path, metrics_path=log, progress=False)
    trainer.train()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    losses = {m["iteration"]: m["val_loss"] for m in lines if "val_loss" in m}
    assert sorted(losses) == [4, 8, 12] and all(math.isfinite(v) for v in losses.values())
    best_iteration = min(losses, key=losses.get)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["iteration"] == best_iteration == trainer.best_iteration
    assert best["val_loss"] == losses[best_iteration] == trainer.best_val_loss
    assert load_checkpoint(path)["best_val_loss"] == trainer.best_val_loss
    clone = Trainer(load_snf(tmp_path / "best.pt", DoubleWellEnergy()), cfg, data=data, progress=False)
    assert clone.validate() == losses[best_iteration]  # same parameters, same fixed generator
    assert trainer.validate() == losses[12]  # validation is repeatable


def scripted(trainer, values):
    """Replace the trainer's validation by a fixed sequence of losses."""
    values = iter(values)
    trainer.validate = lambda: next(values)


def test_patience_stops_training_and_resume_keeps_the_best(tmp_path):
    data, path = double_well_data(200), tmp_path / "checkpoint.pt"
    cfg = validating_config(n_iterations=100, validate_every=2, patience=3)
    trainer = Trainer(small_snf(), cfg, data=data, checkpoint_path=path, progress=False)
    scripted(trainer, [3.0, 2.0, 2.5, 2.1])
    trainer.train(8)
    assert (trainer.best_val_loss, trainer.best_iteration, trainer.n_stale) == (2.0, 4, 2)
    assert not trainer.stopped_early and load_checkpoint(tmp_path / "best.pt")["iteration"] == 4

    resumed = Trainer(small_snf(seed=5), cfg, data=data, checkpoint_path=path, progress=False)
    assert (resumed.iteration, resumed.best_val_loss, resumed.best_iteration, resumed.n_stale) == (8, 2.0, 4, 2)
    scripted(resumed, [2.2, 1.0])
    history = resumed.train()
    assert resumed.stopped_early and [m["iteration"] for m in history] == [9, 10]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 4  # 2.2 at iteration 10 was no better
    assert load_checkpoint(path)["iteration"] == 10
    assert Trainer(small_snf(), cfg, data=data, checkpoint_path=path, progress=False).train() == []


def test_validation_configuration_errors():
    with pytest.raises(ValueError, match="validation_fraction"):
        TrainConfig(validation_fraction=1.0)
    with pytest.raises(ValueError, match="validate_every"):
        TrainConfig(validate_every=0)
    with pytest.raises(ValueError, match="no validation or no training frames"):
        Trainer(small_snf(), validating_config(validation_fraction=0.001), data=double_well_data(100),
                progress=False)
    with pytest.raises(ValueError, match="single-process"):
        Trainer(small_snf(), validating_config(), data=double_well_data(100), progress=False,
                process_group=object())
    with pytest.raises(ValueError, match="no validation frames"):
        Trainer(small_snf(), TrainConfig(), data=double_well_data(100), progress=False).validate()


def test_load_run_prefers_best_pt(tmp_path):
    from openmm_snf.config import resolve_config
    from openmm_snf.runs import build_run, load_run
    from openmm_snf.train import save_checkpoint
    overrides = {"data": {"method": "md",
                          "md": {"n_frames": 20, "n_replicas": 2, "steps_per_frame": 5, "equilibration_steps": 10}},
                 "energy": {"platform": "Reference"},
                 "training": {"n_iterations": 4, "batch_size": 16, "validation_fraction": 0.25, "validate_every": 2}}
    config = resolve_config({"source": "double_well"}, overrides=overrides)
    run, trainer = build_run(tmp_path / "run", config, progress=False)
    trainer.train()
    assert len(trainer.val_data) == 10 and (tmp_path / "run" / "best.pt").is_file()
    with torch.no_grad():
        for p in run.snf.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "run" / "best.pt", run.snf)
    for (name, a), b in zip(run.snf.state_dict().items(), load_run(tmp_path / "run").snf.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    (tmp_path / "run" / "best.pt").unlink()
    last = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for (name, a), b in zip(last.items(), load_run(tmp_path / "run").snf.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_ring_frames_option_and_runs_saved_before_it(tmp_path):
    """A peptide with a phenyl ring gets its ring in a local frame by default; a run whose config.yaml predates
    the option (no coordinates.ring_frames) reopens with the ring's z-matrix rows its weights were trained on."""
    import yaml
    from openmm_snf.config import resolve_config
    from openmm_snf.runs import build_run, load_run
    pdb = Path(__file__).parent / "data" / "ace_ser_phe_nme.pdb"
    overrides = {"data": {"method": "md", "seed_rare_states": None, "balance_states": 0.0,
                          "md": {"n_frames": 20, "n_replicas": 2, "steps_per_frame": 5, "equilibration_steps": 10}},
                 "energy": {"platform": "Reference"}, "training": {"n_iterations": 1, "batch_size": 8}}
    for ring_frames in (True, False):
        folder = tmp_path / f"run_{ring_frames}"
        config = resolve_config({"source": str(pdb)}, overrides={**overrides, "coordinates": {"ring_frames": ring_frames}})
        run, trainer = build_run(folder, config, progress=False)
        trainer.train()
        transform = run.snf.blocks[-1]
        assert len(transform.ring_blocks) == ring_frames and transform.dim == 3 * 53 - 6
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    del saved["coordinates"]["ring_frames"]
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    reopened = load_run(folder)
    assert len(reopened.snf.blocks[-1].ring_blocks) == 0
    for (name, a), b in zip(run.snf.state_dict().items(), reopened.snf.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_weighted_data_train_the_flow_toward_the_weighted_distribution():
    """Frames from a flat x-distribution, weighted by exp(-u(x)) (what tempering/umbrella sidecars give):
    the flow learns the double well's population split; the same frames unweighted teach a flat split."""
    gen = torch.Generator().manual_seed(4)
    n = 6000
    x = torch.stack([torch.rand(n, generator=gen, dtype=torch.float64) * 5.0 - 2.5,
                     torch.randn(n, generator=gen, dtype=torch.float64)], 1)
    energy = DoubleWellEnergy()
    log_w = -(energy(x) - 0.5 * x[:, 1] ** 2)  # flat proposal in x; y already Boltzmann
    grid = torch.linspace(-4, 4, 40001, dtype=torch.float64)
    p = torch.exp(-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid))
    exact_right = float(p[grid > 0].sum() / p.sum())  # 0.844
    fractions = {}
    for weighted in (True, False):
        torch.manual_seed(0)
        snf = build_snf(2, None, energy, n_blocks=3, hidden=(32, 32), stochastic=None)
        cfg = TrainConfig(n_iterations=300, batch_size=256, learning_rate=3e-3, ess_every=0)
        Trainer(snf, cfg, data=x.float(), data_log_weights=log_w.numpy() if weighted else None,
                progress=False).train()
        drawn = snf.sample(4000, generator=torch.Generator().manual_seed(1)).x
        fractions[weighted] = float((drawn[:, 0] > 0).double().mean())
    assert abs(fractions[True] - exact_right) < 0.06, fractions
    assert abs(fractions[False] - 0.5) < 0.06, fractions


def test_data_log_weights_are_checked():
    with pytest.raises(ValueError, match="one entry per data frame"):
        Trainer(small_snf(), TrainConfig(), data=double_well_data(100), data_log_weights=[0.0] * 99, progress=False)
    with pytest.raises(ValueError, match="finite"):
        Trainer(small_snf(), TrainConfig(), data=double_well_data(3), data_log_weights=[0.0, float("nan"), 0.0],
                progress=False)


def test_balanced_training_weights_keep_the_importance_weights_exact():
    """Data weights balanced so that x < 0 (15.6% of the Boltzmann mass) holds 45% of the training weight:
    the flow proposes the minority well about that often, and its exact importance weights still give the
    right-well population within 4 standard errors."""
    from openmm_snf.training_data import _balance_states
    data = double_well_data(6000, seed=5)
    left = (data[:, 0] < 0).numpy()
    log_w = _balance_states(np.zeros(len(data)), {"x<0": left, "x>0": ~left}, 0.45)
    shares = np.exp(log_w) / np.exp(log_w).sum()
    assert shares[left].sum() == pytest.approx(0.45) and np.ptp(log_w[~left]) == 0 and np.ptp(log_w[left]) == 0
    np.testing.assert_array_equal(_balance_states(log_w, {"x<0": left, "x>0": ~left}, 0.3), log_w)  # no-op
    torch.manual_seed(0)
    snf = build_snf(2, None, DoubleWellEnergy(), n_blocks=3, hidden=(32, 32), stochastic=None)
    Trainer(snf, TrainConfig(n_iterations=300, batch_size=256, learning_rate=3e-3, ess_every=0), data=data,
            data_log_weights=log_w, progress=False).train()
    drawn = snf.sample(8000, generator=torch.Generator().manual_seed(2))
    right = (drawn.x[:, 0] > 0).double().numpy()
    assert abs(1 - right.mean() - 0.45) < 0.08  # the flow follows the balanced weights
    w = np.exp(drawn.log_weights.numpy() - drawn.log_weights.numpy().max())
    w /= w.sum()
    estimate = float(np.sum(w * right))
    stderr = math.sqrt(float(np.sum(w**2 * (right - estimate) ** 2)))
    grid = torch.linspace(-4, 4, 40001, dtype=torch.float64)
    p = torch.exp(-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid))
    exact = float(p[grid > 0].sum() / p.sum())
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)


def test_reverse_start_schedule_and_validation():
    cfg = TrainConfig(n_iterations=20, learning_rate=1.0, lr_schedule="cosine", lr_final_factor=0.1,
                      weight_reverse=1.0, reverse_start=0.55)
    assert cfg.reverse_from == 11
    lrs = [learning_rate_at(cfg, i) for i in range(20)]
    assert lrs[0] == 1.0 and lrs[10] == pytest.approx(0.1)               # phase one: 1 -> 0.1
    assert lrs[11] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.01)  # phase two: 0.1 -> 0.01
    assert all(a >= b for a, b in zip(lrs[:11], lrs[1:11])) and all(a >= b for a, b in zip(lrs[11:], lrs[12:]))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="reverse_start"):
            TrainConfig(reverse_start=bad)
    # with one term only there is one phase
    assert TrainConfig(reverse_start=0.5).reverse_from == 0
    assert TrainConfig(reverse_start=0.5, weight_forward=0.0, weight_reverse=1.0).reverse_from == 0


def test_reverse_phase_sharpens_the_flow_and_keeps_the_weights_exact():
    """Maximum likelihood on balanced data (45% of the weight in the minority well x < 0), then ML + reverse
    KL from iteration 300: the reverse phase starts with fresh Adam moments, the flow still proposes both
    wells, its Kish ESS rises, and the importance-weighted log Z and minority population match the exact
    values within 4 standard errors."""
    from openmm_snf.training_data import _balance_states
    data = double_well_data(6000, seed=5)
    left = (data[:, 0] < 0).numpy()
    log_w = _balance_states(np.zeros(len(data)), {"x<0": left, "x>0": ~left}, 0.45)
    torch.manual_seed(0)
    snf = build_snf(2, None, DoubleWellEnergy(), n_blocks=3, hidden=(32, 32), stochastic=None)
    cfg = TrainConfig(n_iterations=500, batch_size=256, learning_rate=3e-3, ess_every=0, weight_forward=0.1,
                      weight_reverse=1.0, reverse_start=0.6, lr_schedule="cosine")
    trainer = Trainer(snf, cfg, data=data, data_log_weights=log_w, progress=False)
    history = trainer.train(300)
    assert all("loss_reverse" not in m for m in history)
    ess_ml = kish_ess_fraction(snf)
    trainer.step()
    assert {state["step"].item() for state in trainer.optimizer.state.values()} == {1}  # moments restarted
    history = trainer.train()
    assert all("loss_reverse" in m for m in history)
    drawn = snf.sample(20000, generator=torch.Generator().manual_seed(3))
    lw = drawn.log_weights.double().numpy()
    x_left = (drawn.x[:, 0] < 0).double().numpy()
    assert x_left.mean() > 0.05                                        # the minority well is still proposed
    w = np.exp(lw - lw.max())
    assert kish_ess_fraction(snf) > ess_ml
    grid = torch.linspace(-4, 4, 40001, dtype=torch.float64)
    p = torch.exp(-(grid ** 4 - 6 * grid ** 2 - 0.5 * grid))
    log_z = math.log(float(p.sum() * (grid[1] - grid[0]))) + 0.5 * math.log(2 * math.pi)
    mean = w.mean()
    estimate, stderr = math.log(mean) + lw.max(), w.std() / math.sqrt(len(w)) / mean
    assert abs(estimate - log_z) < 4 * stderr + 1e-3, (estimate, log_z, stderr)
    population = float(np.sum(w * x_left) / w.sum())
    pop_err = math.sqrt(float(np.sum((w / w.sum()) ** 2 * (x_left - population) ** 2)))
    exact_left = float(p[grid < 0].sum() / p.sum())
    assert abs(population - exact_left) < 4 * pop_err + 1e-3, (population, exact_left, pop_err)


def kish_ess_fraction(snf, n=8000, seed=11):
    lw = snf.sample(n, generator=torch.Generator().manual_seed(seed)).log_weights.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))) / n


def test_a_run_trained_from_relative_paths_loads_from_any_directory(tmp_path, monkeypatch):
    """'train mywell --out run' then 'sample run' from another directory: config.yaml holds absolute paths
    for the files it was given (shipped names stay names)."""
    import shutil
    from openmm_snf.config import resolve_config
    from openmm_snf.runs import build_run, load_run
    from openmm_snf.systems import SHIPPED_DIR
    shutil.copytree(SHIPPED_DIR / "double_well", tmp_path / "work" / "mywell")
    monkeypatch.chdir(tmp_path / "work")
    overrides = {"data": {"method": "md",
                          "md": {"n_frames": 20, "n_replicas": 2, "steps_per_frame": 5, "equilibration_steps": 10}},
                 "energy": {"platform": "Reference"}, "training": {"n_iterations": 2, "batch_size": 16}}
    config = resolve_config({"source": "mywell"}, overrides=overrides)
    assert config["system"]["source"] == str(tmp_path / "work" / "mywell")
    assert resolve_config({"source": "double_well"})["system"]["source"] == "double_well"
    run, trainer = build_run(Path("run"), config, progress=False)
    trainer.train()
    monkeypatch.chdir(tmp_path)
    assert load_run(tmp_path / "work" / "run").mol.n_atoms == 1

"""The openmm-snf workflow end to end (md -> train -> sample -> free-energy -> report) and its bad-input errors."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from openmm_snf.cli import build_parser, main

EXACT_DOUBLE_WELL_DF = 1.6906  # F(x < 0) - F(x > 0) in kT, by quadrature (see test_snf_openmm.py)
COMMANDS = ["md", "umbrella", "train", "sample", "free-energy", "report", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"openmm-snf {command}" in text and "--" in text
    if command != "report":
        assert "default" in text


def test_top_level_help_lists_commands():
    text = build_parser().format_help()
    assert all(command in text for command in COMMANDS)


@pytest.fixture(scope="module")
def double_well_run(tmp_path_factory):
    """The README's workflow with every default: `md double_well` (parallel tempering, no hand-placed starts),
    `train double_well --data md.dcd` (its weights sidecar used), then 4000 samples."""
    folder = tmp_path_factory.mktemp("dw")
    run = folder / "run"
    assert main(["md", "double_well", "--out", str(folder / "md.dcd")]) == 0
    assert main(["train", "double_well", "--data", str(folder / "md.dcd"), "--out", str(run), "--platform", "CPU"]) == 0
    assert main(["sample", str(run), "--n", "4000", "--out", str(folder / "samples.dcd"), "--seed", "3",
                 "--resample", "500"]) == 0
    return folder


def test_double_well_free_energy_matches_exact(double_well_run, capsys):
    capsys.readouterr()
    samples = double_well_run / "samples.dcd"
    assert main(["free-energy", str(samples), "--states", "A: x < 0", "B: x > 0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ci_low"] <= EXACT_DOUBLE_WELL_DF <= result["ci_high"], result
    assert abs(result["delta_f"] - EXACT_DOUBLE_WELL_DF) < 0.1, result
    assert result["ci_high"] - result["ci_low"] < 0.4
    assert result["delta_f_kj_per_mol"] == pytest.approx(result["delta_f"] * result["kT"])
    assert result["ess_total"] > 200
    assert result["verdict"]["reliable"] is True and result["verdict"]["k_hat"] < 0.7, result["verdict"]


def test_samples_round_trip_through_mdtraj(double_well_run):
    folder = double_well_run
    traj = mdtraj.load(str(folder / "samples.dcd"), top=str(folder / "samples.pdb"))
    sidecar = np.load(folder / "samples.weights.npz")
    assert traj.n_frames == 4000 and traj.n_atoms == 1
    assert sidecar["log_weights"].shape == (4000,) and np.all(np.isfinite(sidecar["log_weights"]))
    np.testing.assert_allclose(sidecar["weights"].sum(), 1.0)
    # the stored reduced energies are the double-well formula at the stored (float32) coordinates
    x, y, z = traj.xyz[:, 0].T.astype(np.float64)
    u = x**4 - 6 * x**2 - 0.5 * x + 0.5 * y**2 + 0.5 * z**2
    np.testing.assert_allclose(sidecar["reduced_energies"], u, atol=1e-4, rtol=1e-5)
    csv = np.genfromtxt(folder / "samples.weights.csv", delimiter=",", names=True)
    np.testing.assert_allclose(csv["log_weights"], sidecar["log_weights"])
    resampled = mdtraj.load(str(folder / "samples-resampled.dcd"), top=str(folder / "samples-resampled.pdb"))
    assert resampled.n_frames == 500


def test_resume_continues_and_same_seed_same_samples(double_well_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(double_well_run / "run", run)
    before = sum(1 for _ in open(run / "metrics.jsonl"))
    assert main(["train", "double_well", "--out", str(run), "--resume", "--iterations", "610"]) == 0
    assert sum(1 for _ in open(run / "metrics.jsonl")) == before + 10
    a, b = tmp_path / "a.dcd", tmp_path / "b.dcd"
    for out in (a, b):
        assert main(["sample", str(run), "--n", "300", "--out", str(out), "--seed", "5"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.weights.npz")["log_weights"],
                                  np.load(tmp_path / "b.weights.npz")["log_weights"])


def test_report_writes_plots(double_well_run):
    out = double_well_run / "plots"
    assert main(["report", str(double_well_run / "run"), "--samples", str(double_well_run / "samples.dcd"),
                 "--out-dir", str(out)]) == 0
    for name in ("training_curves.png", "log_weights.png", "energies.png", "convergence.png", "profile_x.png"):
        path = out / name
        assert path.stat().st_size > 10_000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_alanine_dipeptide_end_to_end_through_subprocess(tmp_path):
    """md -> train --data -> sample -> free-energy through the installed console script, tiny budgets."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {n_blocks: 1, hidden: [16], n_steps: 2}\n"
                      "training: {n_iterations: 3, batch_size: 16, ess_every: 0, checkpoint_every: 0}\n")
    cli = [sys.executable, "-m", "openmm_snf.cli"]

    def run(*argv):
        done = subprocess.run(cli + list(argv), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("md", "alanine_dipeptide_vacuum", "--out", "md.dcd", "--frames", "40", "--steps-per-frame", "20",
        "--replicas", "4", "--equilibration", "100")
    run("train", "alanine_dipeptide_vacuum", "--data", "md.dcd", "--config", str(config), "--out", "run")
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "data.dcd").exists()
    out = run("sample", "run", "--n", "1000", "--out", "samples.dcd", "--anneal", "0")
    # three training iterations: an under-trained model, flagged by its ESS and k-hat, with what to do
    assert "Kish ESS" in out and "phi<0: ESS" in out and "phi>0: ESS" in out
    line = next(line for line in out.splitlines() if line.startswith("UNRELIABLE:"))
    assert "(< 1%)" in line and "Pareto k-hat" in line and "--anneal K" in line, out
    traj = mdtraj.load(str(tmp_path / "samples.dcd"), top=str(tmp_path / "samples.pdb"))
    assert traj.n_frames == 1000 and traj.n_atoms == 22
    strict = subprocess.run(cli + ["sample", "run", "--n", "1000", "--out", "strict.dcd", "--strict", "--anneal", "0"],
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert strict.returncode == 3 and (tmp_path / "strict.dcd").is_file(), strict.stderr
    out = run("free-energy", "md.dcd", "--states", "A: phi < 0", "B: phi > -4", "--json")
    result = json.loads(out)
    assert result["n_b"] == 160 and math.isfinite(result["delta_f"])


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture()
def weighted(tmp_path, double_well_run):
    for name in ("samples.dcd", "samples.pdb", "samples.weights.npz", "samples.weights.csv"):
        shutil.copy(double_well_run / name, tmp_path / name)
    return tmp_path / "samples.dcd"


def _fails(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("openmm-snf ") and "error:" in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_free_energy_bad_inputs(weighted, tmp_path, capsys):
    states = ["--states", "A: x < 0", "B: x > 0"]
    _fails(["free-energy", str(tmp_path / "none.dcd")] + states, capsys, "none.dcd")
    _fails(["free-energy", str(weighted), "--states", "A: x < 0", "B: theta > 0"], capsys,
           "unknown collective variable 'theta'")
    _fails(["free-energy", str(weighted), "--states", "A: x < 0", "B: x > 100"], capsys, "no samples")
    assert main(["free-energy", str(weighted), "--states", "A: x < 0", "B: x > 2.3"]) == 0
    printed = capsys.readouterr().out
    assert "UNRELIABLE: state B has ESS" in printed and "draw about" in printed and "samples (--n " in printed
    assert main(["free-energy", str(weighted), "--states", "A: x < 0", "B: x > 2.3", "--strict"]) == 3
    capsys.readouterr()
    aldp = tmp_path / "aldp.pdb"
    from openmm_snf.systems import SHIPPED_DIR
    shutil.copy(SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb", aldp)
    _fails(["free-energy", str(weighted), "--top", str(aldp)] + states, capsys, "22")
    npz = tmp_path / "samples.weights.npz"
    data = dict(np.load(npz))
    np.savez(npz, **{**data, "log_weights": data["log_weights"][:-1]})
    _fails(["free-energy", str(weighted)] + states, capsys, "log_weights")
    bad = data["log_weights"].copy()
    bad[7] = np.nan
    np.savez(npz, **{**data, "log_weights": bad})
    _fails(["free-energy", str(weighted)] + states, capsys, "7")


def test_existing_outputs_are_not_overwritten(double_well_run, weighted, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _fails(["sample", str(double_well_run / "run"), "--n", "10", "--out", str(weighted)], capsys, "exists")
    _fails(["md", "double_well", "--out", str(weighted), "--frames", "2"], capsys, "exists")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_train_and_sample_bad_inputs(double_well_run, tmp_path, capsys):
    run = double_well_run / "run"
    config_before = (run / "config.yaml").read_text()
    _fails(["train", "double_well", "--out", str(run)], capsys, "already holds a run", "--resume")
    assert (run / "config.yaml").read_text() == config_before
    _fails(["train", "double_well", "--out", str(tmp_path / "new"), "--resume"], capsys, "no config.yaml")
    _fails(["train", "double_well", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "no.yaml")], capsys,
           "no.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("training: {n_iteration: 5}\n")
    _fails(["train", "double_well", "--out", str(tmp_path / "r2"), "--config", str(wrong)], capsys,
           "unknown option 'n_iteration'")
    _fails(["train", "alanine_dipeptide_vacuum", "--out", str(tmp_path / "r3"), "--data",
            str(double_well_run / "samples.dcd")], capsys, "1 atoms", "22")
    _fails(["sample", str(tmp_path), "--n", "10", "--out", str(tmp_path / "s.dcd")], capsys, "not a finished run")
    _fails(["md", "no_such_thing", "--out", str(tmp_path / "m.dcd")], capsys, "no_such_thing")


def test_umbrella_writes_mbar_weighted_frames(tmp_path, capsys):
    out = tmp_path / "u.dcd"
    assert main(["umbrella", "alanine_dipeptide_vacuum", "--out", str(out), "--frames", "60", "--steps-per-frame",
                 "50", "--equilibration", "500"]) == 0
    printed = capsys.readouterr().out
    assert "umbrella sampling + MBAR" in printed and "1440 frames (24 windows x 60)" in printed
    sidecar = np.load(tmp_path / "u.weights.npz")
    assert sidecar["log_weights"].shape == (1440,) and np.all(np.isfinite(sidecar["log_weights"]))
    assert np.all(np.isfinite(sidecar["reduced_energies"])) and list(np.unique(sidecar["window"])) == list(range(24))
    assert main(["free-energy", str(out), "--states", "A: phi > 0", "B: phi < 0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # F(phi>0) - F(phi<0) of ALDP vacuum at 1000 K is about 2.2 kT (long MD); a short umbrella run is near it
    assert 0.5 < result["delta_f"] < 4.0
    # a sliver of phi holds a handful of frames: the verdict's advice is about the umbrella run, not a flow
    assert main(["free-energy", str(out), "--states", "A: phi > 3.12", "B: phi < 0"]) == 0
    printed = capsys.readouterr().out
    assert "UNRELIABLE: state A has ESS" in printed and "run the umbrella sampling longer (--frames)" in printed
    assert "train" not in printed and "--n" not in printed
    assert main(["free-energy", str(out), "--states", "A: phi > 3.2", "B: phi < 0"]) == 2  # no frame beyond pi
    printed = capsys.readouterr()
    assert "UNRELIABLE: state A has no samples" in printed.out and "bias the CV" in printed.out
    assert "train" not in printed.out and "has no samples" in printed.err
    _fails(["umbrella", "alanine_dipeptide_vacuum", "--out", str(tmp_path / "v.dcd"), "--cv", "distance:0,1"],
           capsys, "not a dihedral")


def test_annealed_sampling_of_a_flow_only_run(double_well_run, tmp_path, capsys):
    run = double_well_run / "run"  # the double well's default model is a flow without stochastic blocks
    capsys.readouterr()
    for kernel, step in (("mc", "0.2"), ("mala", "0.05")):
        samples = tmp_path / f"annealed-{kernel}.dcd"
        assert main(["sample", str(run), "--n", "3000", "--out", str(samples), "--anneal", "10", "--anneal-kernel",
                     kernel, "--anneal-step-size", step, "--seed", "2"]) == 0
        assert "Kish ESS" in capsys.readouterr().out
        assert main(["free-energy", str(samples), "--states", "A: x < 0", "B: x > 0", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["ci_low"] <= EXACT_DOUBLE_WELL_DF <= result["ci_high"], (kernel, result)
    # a run with Metropolis blocks cannot be annealed: a clear error, nothing written
    config = tmp_path / "snf.yaml"
    config.write_text("model: {flow: realnvp, stochastic: mc}\ntraining: {n_iterations: 2}\n"
                      "data: {tempering: {n_frames: 20, equilibration_steps: 0}}\n")
    snf_run = tmp_path / "snf"
    assert main(["train", "double_well", "--out", str(snf_run), "--config", str(config)]) == 0
    refused = tmp_path / "refused.dcd"
    assert main(["sample", str(snf_run), "--n", "10", "--out", str(refused), "--anneal", "5"]) == 2
    assert "without stochastic blocks" in capsys.readouterr().err and not refused.exists()


def _left_well_only(source: Path, target: Path) -> Path:
    """The weighted samples of ``source`` with x < 0 only, as a sampler that never proposed x > 0 would give."""
    traj = mdtraj.load(str(source), top=str(source.with_suffix(".pdb")))
    keep = traj.xyz[:, 0, 0] < 0
    traj[keep].save_dcd(str(target))
    traj[:1].save_pdb(str(target.with_suffix(".pdb")))
    sidecar = dict(np.load(source.with_suffix(".weights.npz")))
    sidecar.pop("dcd_sha256")  # the fingerprint of the source's DCD: this is another trajectory
    np.savez(target.with_suffix(".weights.npz"),
             **{k: v[keep] if v.shape == keep.shape else v for k, v in sidecar.items()})
    return target


def test_uneven_weights_advice_names_umbrella_sampling_once_annealing_is_heavy():
    """Flow-only models: 'raise --anneal' alone below the stages --anneal auto gives a poor flow; from there on
    also umbrella sampling and free-energy, with states that free-energy's parser accepts."""
    from openmm_snf.analysis.states import parse_state
    from openmm_snf.cli import _weight_remedy
    from openmm_snf.sampling import AUTO_ANNEAL_STAGES, POOR_FLOW_STAGES
    assert "--anneal K" in _weight_remedy(True, 0) and "umbrella" not in _weight_remedy(True, 0)
    assert "umbrella" not in _weight_remedy(True, AUTO_ANNEAL_STAGES)
    assert "umbrella" not in _weight_remedy(False, POOR_FLOW_STAGES)
    advice = _weight_remedy(True, POOR_FLOW_STAGES)
    assert f"raise --anneal (now {POOR_FLOW_STAGES})" in advice and "--cv phi[RES] psi[RES]" in advice
    states = advice.split("--states ")[1].replace("RES", "ALA2").strip("'").split('" "')
    for text in states:
        assert parse_state(text.strip('"')).label in ("A", "B")


def test_verdict_flags_a_model_trained_on_one_well(double_well_run, tmp_path, capsys):
    """Plain MD from the left well only (the README workflow's failure before tempering): the default flow
    learns that well and proposes x > 0 a handful of times at most (so --anneal auto anneals it: too few
    pilot samples in x > 0 to judge their tail); the verdict flags it, whichever line comes first."""
    config = tmp_path / "one_well.yaml"
    config.write_text("data: {method: md, balance_states: 0, md: {starts: [[[-1.7, 0.0, 0.0]]], n_frames: 250, "
                      "steps_per_frame: 20, timestep: 5.0, friction: 5.0}}\ntraining: {n_iterations: 60, "
                      "checkpoint_every: 0, ess_every: 0}\n")
    run, samples = tmp_path / "run", tmp_path / "s.dcd"
    assert main(["train", "double_well", "--out", str(run), "--config", str(config), "--platform", "CPU"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4000", "--out", str(samples), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "x<0: ESS" in printed and "UNRELIABLE: state x>0 has " in printed, printed
    assert main(["sample", str(run), "--n", "4000", "--out", str(samples), "--seed", "1", "--force",
                 "--strict"]) == 3
    capsys.readouterr()
    n_right = int(np.sum(mdtraj.load(str(samples), top=str(samples.with_suffix(".pdb"))).xyz[:, 0, 0] > 0))
    status = main(["free-energy", str(samples), "--states", "A: x < 0", "B: x > 0", "--json"])
    captured = capsys.readouterr()
    if n_right == 0:  # not one proposal in the right well: no free energy, an error
        assert status == 2 and "no samples" in captured.err
    else:  # a few: a free energy far from the exact one, and flagged
        result = json.loads(captured.out)
        assert status == 0 and captured.err.startswith("UNRELIABLE: ") and "state B has" in captured.err
        assert abs(result["delta_f"] - EXACT_DOUBLE_WELL_DF) > 1.0
        assert result["verdict"]["reliable"] is False
        assert any(reason.startswith("state B") for reason in result["verdict"]["reasons"])
        assert main(["free-energy", str(samples), "--states", "A: x < 0", "B: x > 0", "--strict"]) == 3
        capsys.readouterr()
    # a sampler that never proposed x > 0 at all: UNRELIABLE, then a one-line error; no inf or nan anywhere
    left = _left_well_only(double_well_run / "samples.dcd", tmp_path / "left.dcd")
    assert main(["free-energy", str(left), "--states", "A: x < 0", "B: x > 0"]) == 2
    captured = capsys.readouterr()
    assert "UNRELIABLE: state B has no samples; the sampler never proposed B" in captured.out
    assert captured.err.startswith("openmm-snf free-energy: error: state 'B: x > 0' has no samples")
    assert len(captured.err.strip().splitlines()) == 1
    assert not any(word in (captured.out + captured.err).lower() for word in ("inf ", "nan", "infinity"))


def test_sample_draws_to_a_precision_by_default(double_well_run, tmp_path, capsys):
    """No --n: rounds until each state's ESS gives +-0.15 kT (here one round, capped by --max-n)."""
    capsys.readouterr()
    out = tmp_path / "auto.dcd"
    assert main(["sample", str(double_well_run / "run"), "--max-n", "3000", "--anneal", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert "--n auto: stopped at 3000 samples: " in printed and "wrote 3000 samples" in printed, printed
    assert summary["n"] == 3000 and summary["n_auto"]["precision_kT"] == 0.15
    assert summary["n_auto"]["stopped"] in printed


def test_strict_is_documented(capsys):
    for command in ("sample", "free-energy"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--strict" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_resolve(path):
    from openmm_snf.config import resolve_config
    config = resolve_config({"source": "alanine_dipeptide_vacuum"}, path)
    assert config["model"]["flow"] in ("realnvp", "spline") and config["training"]["n_iterations"] > 0


def test_anneal_auto_samples_a_good_flow_alone_and_anneals_a_poor_one(double_well_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["sample", str(double_well_run / "run"), "--n", "200", "--out", str(tmp_path / "good.dcd")]) == 0
    out = capsys.readouterr().out
    assert "--anneal auto: pilot of 4000 flow samples" in out and "sampling the flow alone" in out, out
    poor = tmp_path / "poor"
    config = tmp_path / "poor.yaml"
    config.write_text("training: {n_iterations: 1, learning_rate: 0.00001}\n"
                      "data: {tempering: {n_frames: 20, equilibration_steps: 0}}\n")
    assert main(["train", "double_well", "--out", str(poor), "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["sample", str(poor), "--n", "200", "--out", str(tmp_path / "poor.dcd")]) == 0
    out = capsys.readouterr().out
    assert "annealing with 40 stages" in out, out
    with pytest.raises(SystemExit):
        main(["sample", str(poor), "--n", "10", "--out", str(tmp_path / "x.dcd"), "--anneal", "many"])
    assert "expected 'auto' or a whole number" in capsys.readouterr().err


def test_anneal_auto_anneals_a_flow_heavy_tailed_within_a_state(monkeypatch):
    """Good overall weights (dominated by the common state) hide a rare state whose own weights have a heavy
    tail: the pilot looks inside each state and anneals."""
    from types import SimpleNamespace
    from openmm_snf import sampling
    rng = np.random.default_rng(3)
    rare = np.arange(sampling.PILOT_SAMPLES) < 300
    n = sampling.PILOT_SAMPLES
    log_w = np.where(rare, rng.normal(-20.0, 3.0, n), rng.normal(0.0, 0.1, n))
    monkeypatch.setattr(sampling, "sample", lambda run, n, **kw: {"log_weights": log_w, "xyz": None})
    run = SimpleNamespace(config={"model": {"stochastic": None}}, mol=None)
    for states, stages in (({"A": ~rare, "B": rare}, sampling.AUTO_ANNEAL_STAGES), ({"A": np.ones_like(rare)}, 0)):
        monkeypatch.setattr(sampling, "frame_states", lambda mol, xyz: states)
        chosen, reason = sampling.choose_annealing(run)
        assert chosen == stages, reason
    assert "k-hat within B" not in reason
    monkeypatch.setattr(sampling, "frame_states", lambda mol, xyz: {"A": ~rare, "B": rare})
    assert "k-hat within B" in sampling.choose_annealing(run)[1]
    # B's weights with a tail of index 0.6 (infinite variance; the verdict's 0.7 would pass it): anneal
    from openmm_snf.weights import pareto_khat
    tail = np.zeros(n)
    tail[rare] = -0.6 * np.log((np.arange(rare.sum()) + 0.5) / rare.sum())  # Pareto quantiles, tail index 0.6
    log_w = np.where(rare, tail - 5.0, rng.normal(0.0, 0.1, n))
    assert 0.5 < pareto_khat(log_w[rare]) < 0.7 and pareto_khat(log_w) <= sampling.PILOT_MAX_KHAT
    chosen, reason = sampling.choose_annealing(run)
    assert chosen == sampling.AUTO_ANNEAL_STAGES and "k-hat within B" in reason
    # the same good weights, but B holds too few pilot samples to judge its tail: anneal
    log_w = rng.normal(0.0, 0.1, n)
    few = np.arange(n) < sampling.PILOT_MIN_STATE_SAMPLES - 1
    monkeypatch.setattr(sampling, "frame_states", lambda mol, xyz: {"A": ~few, "B": few})
    chosen, reason = sampling.choose_annealing(run)
    assert chosen == sampling.AUTO_ANNEAL_STAGES and "too few samples to judge the tail in B (99)" in reason
    # a poor flow (pilot Kish ESS < 5%): twice the stages
    from openmm_snf.weights import kish_ess
    poor = rng.normal(0.0, 2.0, n)
    monkeypatch.setattr(sampling, "sample", lambda run, n, **kw: {"log_weights": poor, "xyz": None})
    assert sampling.VERY_POOR_PILOT_ESS_FRACTION * n < kish_ess(poor) < sampling.POOR_PILOT_ESS_FRACTION * n
    chosen, reason = sampling.choose_annealing(run)
    assert chosen == 2 * sampling.AUTO_ANNEAL_STAGES and f"annealing with {chosen} stages" in reason
    # a very poor flow (pilot Kish ESS < 0.5%): eight times the stages, and a first round of equal cost
    very_poor = rng.normal(0.0, 5.0, n)
    monkeypatch.setattr(sampling, "sample", lambda run, n, **kw: {"log_weights": very_poor, "xyz": None})
    assert kish_ess(very_poor) < sampling.VERY_POOR_PILOT_ESS_FRACTION * n
    chosen, reason = sampling.choose_annealing(run)
    assert chosen == 8 * sampling.AUTO_ANNEAL_STAGES and "annealing with 320 stages" in reason
    assert [sampling.first_round(k) for k in (0, 40, 80, 320)] == [30000, 30000, 30000, 7500]


def test_sample_and_train_write_strict_json_summaries(double_well_run):
    sample = json.loads((double_well_run / "samples.summary.json").read_text())
    weights = np.load(double_well_run / "samples.weights.npz")
    from openmm_snf.weights import kish_ess
    assert sample["command"] == "sample" and sample["n"] == 4000 and sample["seed"] == 3
    assert sample["kish_ess"] == pytest.approx(kish_ess(weights["log_weights"]))
    assert sample["largest_weight"] == pytest.approx(weights["weights"].max())
    train = json.loads((double_well_run / "run" / "summary.json").read_text())
    last = json.loads((double_well_run / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert train["iterations"] == last["iteration"] and train["last"]["loss"] == pytest.approx(last["loss"])
    assert train["data"]["path"].endswith("md.dcd")  # the README workflow: train --data md.dcd

"""Hostile input through ``openmm_snf.cli.main``: exit status 2, one line naming the problem, and the folder
holding every input and output byte-for-byte unchanged. Then the behaviours that must change something:
outputs claimed as a set, --resume semantics, SIGTERM."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from openmm_snf.cli import main
from openmm_snf.systems import SHIPPED_DIR

STATES = ["--states", "A: x < 0", "B: x > 0"]
TINY = {"data": {"tempering": {"n_frames": 50, "steps_per_frame": 20, "n_ladders": 2, "max_temperature": 900.0,
                               "timestep": 5.0, "friction": 1.0, "equilibration_steps": 200}},
        "training": {"n_iterations": 4, "batch_size": 32, "checkpoint_every": 2, "ess_every": 2}}


def _status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's usage errors
        return done.code


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny double-well run, 200 weighted samples from it, 40 frames of MD and an alanine dipeptide PDB."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", "double_well", "--out", str(folder / "run"), "--config", str(folder / "tiny.yaml"),
                 "--platform", "CPU"]) == 0
    assert main(["sample", str(folder / "run"), "--n", "200", "--out", str(folder / "samples.dcd")]) == 0
    assert main(["md", "double_well", "--method", "md", "--out", str(folder / "md.dcd"), "--frames", "20",
                 "--replicas", "2", "--steps-per-frame", "10", "--equilibration", "10", "--timestep", "5"]) == 0
    shutil.copy(SHIPPED_DIR / "alanine_dipeptide_vacuum" / "structure.pdb", folder / "aldp.pdb")
    return folder


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _yaml(w: Path, name: str, text: str) -> None:
    (w / name).write_text(text)


def _write_npz(w: Path, **changes) -> None:
    npz = w / "samples.weights.npz"
    data = dict(np.load(npz))
    data.update(changes)
    np.savez(npz, **data)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _checkpoint_of_another_model(w: Path) -> None:
    state = torch.load(w / "run" / "checkpoint.pt", weights_only=False)
    state["snf_config"] = {**state["snf_config"], "hidden": (8,)}
    torch.save(state, w / "run" / "checkpoint.pt")


def _fail_writes(monkeypatch, code: int) -> None:
    import openmm_snf.io as io

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), "somewhere")
    monkeypatch.setattr(io, "_write_dcd_and_pdb", refuse)


def _read_only(monkeypatch) -> None:
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _overlapping_atoms(w: Path) -> None:
    lines = (w / "aldp.pdb").read_text().splitlines()
    (w / "aldp.pdb").write_text("\n".join(line[:30] + "   1.000   1.000   1.000" + line[54:]
                                          if line.startswith(("ATOM", "HETATM")) else line for line in lines))


def _solvated(w: Path) -> None:
    """The dipeptide with one water molecule in a periodic box (CRYST1)."""
    import openmm.app as app
    import openmm.unit as unit
    pdb = app.PDBFile(str(w / "aldp.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addSolvent(app.ForceField("amber14-all.xml", "amber14/tip3p.xml"), padding=0.3 * unit.nanometer)
    with open(w / "solvated.pdb", "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)


SAMPLE = ["sample", "{w}/run", "--n", "10", "--out", "{w}/new.dcd"]
TRAIN_NEW = ["train", "double_well", "--out", "{w}/new_run", "--config", "{w}/bad.yaml"]
ALDP_MD = ["md", "{w}/aldp.pdb", "--method", "md", "--out", "{w}/aldp_md.dcd", "--frames", "2", "--steps-per-frame",
           "20", "--equilibration", "0", "--replicas", "1"]

# (id, argv with {w} for the folder, fragments the one error line must hold, setup(w, monkeypatch) or None)
CASES = [
    # 1. outputs that are inputs
    ("md-out-overwrites-input-pdb", ["md", "{w}/aldp.pdb", "--out", "{w}/aldp.dcd", "--force"], ["input"], None),
    ("sample-out-replaces-training-data", SAMPLE[:-1] + ["{w}/run/data.dcd", "--force"], ["input"], None),
    ("sidecar-of-a-replaced-dcd", ["free-energy", "{w}/samples.dcd"] + STATES, ["another trajectory"],
     lambda w, mp: shutil.copy(w / "md.dcd", w / "samples.dcd")),
    ("md-without-force-over-a-weighted-set", ["md", "double_well", "--method", "md", "--out", "{w}/samples.dcd",
                                              "--frames", "2"], ["exists", "samples.weights.npz"], None),
    # 5. truncated trajectories
    ("truncated-dcd-free-energy", ["free-energy", "{w}/md.dcd"] + STATES, ["truncated", "md.dcd"],
     lambda w, mp: _truncate(w / "md.dcd")),
    ("truncated-dcd-train-data", ["train", "double_well", "--out", "{w}/new_run", "--data", "{w}/md.dcd"],
     ["truncated"], lambda w, mp: _truncate(w / "md.dcd")),
    # 3. damaged checkpoints
    ("empty-checkpoint-sample", SAMPLE, ["checkpoint.pt", "damaged"],
     lambda w, mp: (w / "run" / "checkpoint.pt").write_bytes(b"")),
    ("truncated-checkpoint-resume", ["train", "double_well", "--out", "{w}/run", "--resume"], ["checkpoint.pt"],
     lambda w, mp: _truncate(w / "run" / "checkpoint.pt")),
    ("random-best-pt-sample", SAMPLE, ["best.pt", "damaged"],
     lambda w, mp: (w / "run" / "best.pt").write_bytes(os.urandom(5000))),
    ("checkpoint-of-another-model", SAMPLE, ["another model"], lambda w, mp: _checkpoint_of_another_model(w)),
    # 3. the environment
    ("read-only-output-folder", ["md", "double_well", "--method", "md", "--out", "{w}/ro.dcd", "--frames", "2"],
     ["cannot write"], lambda w, mp: _read_only(mp)),
    ("read-only-run-folder", ["train", "double_well", "--out", "{w}/new_run"], ["cannot write"],
     lambda w, mp: _read_only(mp)),
    ("full-disk", ["md", "double_well", "--method", "md", "--out", "{w}/full.dcd", "--frames", "2"],
     ["No space left"], lambda w, mp: _fail_writes(mp, errno.ENOSPC)),
    ("train-out-is-a-file", ["train", "double_well", "--out", "{w}/md.dcd"], ["is a file"], None),
    ("md-out-is-a-folder", ["md", "double_well", "--method", "md", "--out", "{w}/folder.dcd", "--frames", "2"],
     ["is a folder"], lambda w, mp: (w / "folder.dcd").mkdir()),
    ("report-out-dir-is-a-file", ["report", "{w}/run", "--out-dir", "{w}/md.dcd"], ["is a file"], None),
    ("md-timestep-blows-up", ALDP_MD + ["--timestep", "50"], ["simulation failed", "--timestep"], None),
    ("md-overlapping-atoms", ALDP_MD, ["overlapping atoms"], lambda w, mp: _overlapping_atoms(w)),
    ("umbrella-degenerate-dihedral", ["umbrella", "{w}/aldp.pdb", "--out", "{w}/u.dcd", "--cv", "dihedral:0,0,0,0"],
     ["four different atoms"], None),
    ("missing-reference", ["free-energy", "{w}/samples.dcd", "--reference", "{w}/nope.pdb"] + STATES,
     ["nope.pdb"], None),
    ("huge-seed", SAMPLE + ["--seed", "99999999999999999999"], ["--seed"], None),
    ("n-iterations-text", TRAIN_NEW, ["training.n_iterations"],
     lambda w, mp: _yaml(w, "bad.yaml", "training: {n_iterations: abc}\n")),
    ("batch-of-800-GB", ["train", "double_well", "--out", "{w}/new_run", "--config", "{w}/tiny.yaml",
                         "--batch-size", "100000000000"], ["out of memory", "--batch-size"], None),
    # 2. configurations that used to leave an unusable run folder
    ("unknown-model-key", TRAIN_NEW, ["model", "unknown option 'width'"],
     lambda w, mp: _yaml(w, "bad.yaml", "model: {width: 3}\n")),
    ("flow-glow", TRAIN_NEW, ["model.flow"], lambda w, mp: _yaml(w, "bad.yaml", "model: {flow: glow}\n")),
    ("zero-blocks", TRAIN_NEW, ["model.n_blocks"], lambda w, mp: _yaml(w, "bad.yaml", "model: {n_blocks: 0}\n")),
    ("hidden-big", TRAIN_NEW, ["model.hidden"], lambda w, mp: _yaml(w, "bad.yaml", "model: {hidden: big}\n")),
    ("training-is-a-number", TRAIN_NEW, ["training"], lambda w, mp: _yaml(w, "bad.yaml", "training: 5\n")),
    ("fractional-batch", TRAIN_NEW, ["training.batch_size"],
     lambda w, mp: _yaml(w, "bad.yaml", "training: {batch_size: 1.5}\n")),
    ("device-gpu", TRAIN_NEW, ["device"], lambda w, mp: _yaml(w, "bad.yaml", "device: gpu\n")),
    ("unknown-md-key", TRAIN_NEW, ["data.md"], lambda w, mp: _yaml(w, "bad.yaml", "data: {md: {frames: 3}}\n")),
    ("tempering-seed-too-large", TRAIN_NEW, ["data.tempering.seed"],
     lambda w, mp: _yaml(w, "bad.yaml", "data: {tempering: {seed: 99999999999}}\n")),
    ("unknown-data-method", TRAIN_NEW, ["data.method"], lambda w, mp: _yaml(w, "bad.yaml", "data: {method: mc}\n")),
    # 6. validation before work
    ("sample-resample-negative", SAMPLE + ["--resample", "-2"], ["--resample"], None),
    ("report-bad-samples", ["report", "{w}/run", "--samples", "{w}/md.dcd", "--out-dir", "{w}/plots"],
     ["weights file not found"], None),
    ("demo-n-zero", ["demo", "--system", "double_well", "--out", "{w}/demo", "--n", "0"], ["--n"], None),
    # 7. nonsense numbers
    ("sidecar-kT-zero", ["free-energy", "{w}/samples.dcd"] + STATES, ["kT"],
     lambda w, mp: _write_npz(w, kT=np.float64(0.0))),
    ("sidecar-kT-negative", ["free-energy", "{w}/samples.dcd"] + STATES, ["kT"],
     lambda w, mp: _write_npz(w, kT=np.float64(-2.5))),
    ("sidecar-kT-nan", ["free-energy", "{w}/samples.dcd"] + STATES, ["kT"],
     lambda w, mp: _write_npz(w, kT=np.float64(np.nan))),
    ("log-weights-1e308", ["free-energy", "{w}/samples.dcd"] + STATES, ["log_weights"],
     lambda w, mp: _write_npz(w, log_weights=np.where(np.arange(200) % 2, 1e308, -1e308))),
    ("learning-rate-inf", TRAIN_NEW, ["training.learning_rate"],
     lambda w, mp: _yaml(w, "bad.yaml", "training: {learning_rate: .inf}\n")),
    ("reverse-kl-nan", ["train", "double_well", "--out", "{w}/new_run", "--reverse-kl", "nan"], ["--reverse-kl"],
     None),
    ("anneal-step-size-inf", SAMPLE + ["--anneal", "2", "--anneal-step-size", "inf"], ["--anneal-step-size"], None),
    ("precision-quad", TRAIN_NEW, ["precision"], lambda w, mp: _yaml(w, "bad.yaml", "energy: {precision: quad}\n")),
    ("hidden-zero-width", TRAIN_NEW, ["model.hidden"], lambda w, mp: _yaml(w, "bad.yaml", "model: {hidden: [0]}\n")),
    ("balance-states-too-large", TRAIN_NEW, ["data.balance_states"],
     lambda w, mp: _yaml(w, "bad.yaml", "data: {balance_states: 0.7}\n")),
    ("seed-rare-states-negative", TRAIN_NEW, ["data.seed_rare_states"],
     lambda w, mp: _yaml(w, "bad.yaml", "data: {seed_rare_states: {n_copies: -1, n_frames: 10}}\n")),
    ("checkpoint-every-negative", TRAIN_NEW, ["checkpoint_every"],
     lambda w, mp: _yaml(w, "bad.yaml", "training: {checkpoint_every: -1}\n")),
    ("identical-state-labels", ["free-energy", "{w}/samples.dcd", "--states", "A: x < 0", "A: x > 0"],
     ["both states"], None),
    # 9. explicit solvent
    ("solvated-pdb", ["md", "{w}/solvated.pdb", "--forcefield", "amber14-all.xml,amber14/tip3p.xml", "--out",
                      "{w}/solv.dcd"], ["explicit solvent", "water"], lambda w, mp: _solvated(w)),
    # 4. --resume
    ("resume-contradicting-batch-size", ["train", "double_well", "--out", "{w}/run", "--resume", "--batch-size",
                                         "7"], ["batch_size 7", "saved: 32"], None),
    ("resume-other-system", ["train", "alanine_dipeptide_vacuum", "--out", "{w}/run", "--resume"],
     ["system.source"], None),
    ("resume-without-checkpoint", ["train", "double_well", "--out", "{w}/run", "--resume"], ["no checkpoint.pt"],
     lambda w, mp: (w / "run" / "checkpoint.pt").unlink()),
]


@pytest.mark.parametrize("argv, fragments, setup", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(workspace, tmp_path, monkeypatch, capsys, argv,
                                                             fragments, setup):
    w = tmp_path / "w"
    shutil.copytree(workspace, w)
    if setup is not None:
        setup(w, monkeypatch)
    before = _snapshot(w)
    capsys.readouterr()
    status = _status([arg.replace("{w}", str(w)) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert status == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("openmm-snf"), err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    monkeypatch.undo()
    assert _snapshot(w) == before


# ------------------------------------------------------------------------------- behaviours that change files

def test_an_unweighted_dcd_replaces_its_whole_set(workspace, tmp_path, capsys):
    """md --force over weighted samples removes their sidecars: free-energy then reads plain MD, never the
    foreign weights (it used to report 0.192 kT instead of the unweighted 0.686 on the double well)."""
    w = tmp_path / "w"
    shutil.copytree(workspace, w)
    assert main(["md", "double_well", "--method", "md", "--out", str(w / "samples.dcd"), "--force", "--frames", "20",
                 "--replicas", "2", "--steps-per-frame", "10", "--equilibration", "10", "--timestep", "5"]) == 0
    assert not (w / "samples.weights.npz").exists() and not (w / "samples.weights.csv").exists()
    capsys.readouterr()
    assert main(["free-energy", str(w / "samples.dcd"), "--cv", "x=position:0,x", "--states", "A: x < -1.5",
                 "B: x > -1.5"]) == 0
    assert "treating its frames as unweighted" in capsys.readouterr().err


def test_resume_trims_metrics_and_applies_only_allowed_options(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # as after a kill between checkpoints: iterations 5-6 logged, the checkpoint still at 4, a line cut short
    extra = [line.replace('"iteration": 4', f'"iteration": {i}') for i, line in ((5, lines[-1]), (6, lines[-1]))]
    (run / "metrics.jsonl").write_text("\n".join(lines + extra) + '\n{"iterat')
    capsys.readouterr()
    assert main(["train", "double_well", "--out", str(run), "--resume", "--iterations", "6", "--platform",
                 "CPU"]) == 0
    assert "--resume applies training.n_iterations: 4 -> 6" in capsys.readouterr().out
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["n_iterations"] == 6


def test_a_new_run_that_fails_leaves_no_folder(workspace, tmp_path, capsys):
    """A failure after the MD data and config.yaml were written (here the first batch: 800 GB) removes the new
    run, so that the same command can be run again with a fixed option."""
    folder = tmp_path / "run"
    assert _status(["train", "double_well", "--out", str(folder), "--config", str(workspace / "tiny.yaml"),
                    "--batch-size", "100000000000"]) == 2
    assert not folder.exists()


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    """`timeout` and batch schedulers send SIGTERM: the command stops like after Ctrl-C, leaving no .tmp files."""
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({**TINY, "training": {**TINY["training"], "n_iterations": 100000,
                                                           "checkpoint_every": 1}}))
    process = subprocess.Popen([sys.executable, "-m", "openmm_snf.cli", "train", "double_well", "--out",
                                str(tmp_path / "run"), "--config", str(config), "--platform", "CPU"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    timer = threading.Timer(300, process.kill)
    timer.start()
    try:
        while not checkpoint.exists() and process.poll() is None:
            threading.Event().wait(0.2)
        threading.Event().wait(1.0)  # well inside the training loop, checkpointing every iteration
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        timer.cancel()
    assert process.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_checkpoint_write_waits_for_the_file(tmp_path, monkeypatch, signum):
    """A signal that arrives inside torch.save is delivered once the checkpoint is complete: raised inside
    torch's zip writer it turned into torch's own RuntimeError ("unexpected pos"), a traceback instead of
    "terminated" (seen once in CI)."""
    from openmm_snf.flows.builder import build_snf
    from openmm_snf.train import load_checkpoint, save_checkpoint
    from openmm_snf.training import checkpoints
    real_save = torch.save

    def interrupted_save(obj, handle):
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # time for the handler to run, were it not held
            pass
        real_save(obj, handle)

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    previous = signal.signal(signum, stop)
    monkeypatch.setattr(checkpoints.torch, "save", interrupted_save)
    try:
        with pytest.raises(Stop):
            save_checkpoint(tmp_path / "flow.pt", build_snf(2, None, None, n_blocks=1, hidden=(8,)))
    finally:
        signal.signal(signum, previous)
    assert load_checkpoint(tmp_path / "flow.pt")["format"] == checkpoints.CHECKPOINT_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["flow.pt"]


def test_debug_shows_the_traceback_and_a_bug_keeps_it(workspace, monkeypatch):
    import openmm_snf.cli as cli
    from openmm_snf.io import InputError
    with pytest.raises(InputError, match="nope.dcd"):
        main(["--debug", "free-energy", str(workspace / "nope.dcd")] + STATES)
    # a ValueError that the package did not raise itself (here from numpy) is a bug, not bad input
    monkeypatch.setattr(cli, "_read_samples", lambda *args: np.zeros(3).reshape(2))
    with pytest.raises(ValueError, match="reshape"):
        main(["free-energy", str(workspace / "samples.dcd")] + STATES)

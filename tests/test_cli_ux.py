"""What a user sees of the CLI: help without repeated defaults, --version, progress bars only on a terminal
(--quiet hides them there), a --forcefield that leaves SYSTEM alone, strict JSON, CVs by residue everywhere."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from openmm_snf import __version__
from openmm_snf.cli import build_parser, main

COMMANDS = ["md", "umbrella", "train", "sample", "free-energy", "report", "demo"]
ROOT = Path(__file__).resolve().parent.parent
PEPTIDE = ROOT / "tests" / "data" / "ace_ser_phe_nme.pdb"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    assert "(default: None)" not in text
    for option in text.split(" --")[1:]:
        assert option.count("(default:") <= 1, option
    if command == "umbrella":
        assert "--seed SEED seed of velocities and Langevin noise (default: 0)" in text
    if command in ("md", "umbrella"):
        assert "--out OUT output .dcd" in text and "--out OUT output .dcd (default" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"openmm-snf {__version__}"


def test_forcefield_does_not_swallow_the_system():
    parser = build_parser()
    assert parser.parse_args(["md", "x.pdb", "--out", "x.dcd", "--quiet"]).quiet  # --quiet after the command too
    assert not parser.parse_args(["md", "x.pdb", "--out", "x.dcd"]).quiet
    args = parser.parse_args(["md", "--forcefield", "amber14-all.xml", "mypep.pdb", "--out", "x.dcd"])
    assert args.system == "mypep.pdb" and args.forcefield == ["amber14-all.xml"]
    args = parser.parse_args(["train", "mypep.pdb", "--forcefield", "amber14-all.xml,implicit/obc2.xml",
                              "--forcefield", "extra.xml", "--out", "run"])
    assert args.forcefield == ["amber14-all.xml", "implicit/obc2.xml", "extra.xml"]


MD_ARGS = ["md", "double_well", "--method", "md", "--frames", "20", "--steps-per-frame", "5", "--equilibration", "0",
           "--replicas", "2"]


def _terminal_output(tmp_path, *options) -> str:
    """stdout + stderr of a short `md` run on a pseudo-terminal (100 columns)."""
    argv = [sys.executable, "-m", "openmm_snf.cli", *options, *MD_ARGS, "--out",
            str(tmp_path / f"md{len(list(tmp_path.iterdir()))}.dcd")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TQDM_DISABLE", None)
    try:
        leader, follower = pty.openpty()
    except OSError as err:  # no pseudo-terminals in this sandbox
        pytest.skip(f"no pseudo-terminal: {err}")
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(argv, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=120) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")  # the terminal's own line ends


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal_and_not_with_quiet(tmp_path, capfd, monkeypatch):
    assert "\r" in _terminal_output(tmp_path)  # the control: a bar is drawn on a terminal
    quiet = _terminal_output(tmp_path, "--quiet")
    assert "\r" not in quiet and "wrote" in quiet
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main([*MD_ARGS, "--out", str(tmp_path / "piped.dcd")]) == 0  # output captured: not a terminal
    piped = capfd.readouterr()
    assert "\r" not in piped.out + piped.err and "wrote" in piped.out


def test_umbrella_and_free_energy_resolve_residue_cvs_alike(tmp_path, capsys):
    """On a three-residue peptide (ACE-ALA-SER-PHE-NME), psi[SER3] is the same torsion in both commands."""
    out = tmp_path / "us.dcd"
    assert main(["--quiet", "umbrella", str(PEPTIDE), "--cv", "psi[SER3]", "--windows", "6", "--frames", "10",
                 "--steps-per-frame", "10", "--equilibration", "50", "--k", "10", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "us.summary.json").read_text())
    import mdtraj
    traj = mdtraj.load(str(out), top=str(tmp_path / "us.pdb"))
    atoms, psi = mdtraj.compute_psi(traj)
    column = [list(quad) for quad in atoms].index(summary["cv_atoms"])
    assert str(traj.topology.atom(summary["cv_atoms"][1]).residue) == "SER3"
    sidecar = np.load(tmp_path / "us.weights.npz")
    assert sidecar["u_kn"].shape == (6, 60) and list(sidecar["N_k"]) == [10] * 6
    centers = sidecar["window_centers"]
    deviation = (psi[:, column][None, :] - centers[:, None] + np.pi) % (2 * np.pi) - np.pi
    np.testing.assert_allclose(sidecar["u_kn"], 0.5 * 10 * deviation ** 2, atol=1e-3)  # float32 DCD
    assert len(summary["neighbour_overlap"]) == 6 and summary["min_neighbour_overlap"] == min(
        summary["neighbour_overlap"])
    if summary["min_neighbour_overlap"] < 0.03:
        assert "warning: MBAR overlap between windows" in captured.err
    assert main(["free-energy", str(out), "--states", "A: psi[SER3] > 0", "B: psi[1] < 0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    weights = np.exp(sidecar["log_weights"] - sidecar["log_weights"].max())
    expected = np.log(weights[psi[:, 1] < 0].sum()) - np.log(weights[psi[:, 1] > 0].sum())
    assert result["delta_f"] == pytest.approx(expected, abs=1e-6)
    assert main(["free-energy", str(out), "--states", "A: psi > 0", "B: psi < 0"]) == 2
    assert "name the residue (psi[ALA2], psi[SER3], psi[PHE4])" in capsys.readouterr().err
    # plots of umbrella samples need no run folder
    assert main(["report", "--samples", str(out)]) == 0
    written = sorted(p.name for p in (tmp_path / "us-plots").iterdir())
    assert written == ["convergence.png", "energies.png", "log_weights.png", "overlap.png", "profile_psi_SER3.png"]
    assert main(["report"]) == 2 and "nothing to plot" in capsys.readouterr().err


def test_free_energy_json_is_strict(tmp_path, capsys):
    """A state that bootstrap replicates can miss gives an infinite std: null in JSON, with an error field."""
    from openmm_snf.io import write_weighted_trajectory
    from openmm_snf.systems import load_system
    mol = load_system("double_well")
    x = np.zeros((50, 1, 3))
    x[:, 0, 0] = np.linspace(-2, 2, 50)
    write_weighted_trajectory(tmp_path / "s.dcd", mol, x, np.zeros(50), np.zeros(50),
                              extra={"kT": mol.kT, "cvs_json": json.dumps(mol.cvs)})
    assert main(["free-energy", str(tmp_path / "s.dcd"), "--states", "A: x > 1.95", "B: x < 1.95", "--json",
                 "--summary", str(tmp_path / "fe.json")]) == 0
    text = capsys.readouterr().out
    assert "Infinity" not in text and "NaN" not in text
    result = json.loads(text)
    assert result["std"] is None and "std=inf" in result["error"]
    assert json.loads((tmp_path / "fe.json").read_text()) == result
    assert result["block_length"] == 1 and result["n_a"] == 1
    assert main(["free-energy", str(tmp_path / "s.dcd"), "--states", "A: x > 0", "B: x < 0", "--plot",
                 str(tmp_path / "states.png")]) == 0
    assert (tmp_path / "states.png").read_bytes()[:4] == b"\x89PNG"


def test_md_dcd_header_holds_the_time_step(tmp_path, capsys):
    import struct
    import mdtraj
    out = tmp_path / "md.dcd"
    assert main(["md", "double_well", "--method", "md", "--out", str(out), "--frames", "5", "--steps-per-frame", "20",
                 "--timestep", "5", "--equilibration", "0", "--replicas", "2"]) == 0
    header = out.read_bytes()[:48]
    n_frames, first_step, interval = struct.unpack("<3i", header[8:20])
    (delta,) = struct.unpack("<f", header[44:48])
    akma_fs = 48.88821  # the CHARMM time unit that DCD headers count in
    assert (n_frames, interval) == (10, 20) and delta * akma_fs == pytest.approx(5.0, rel=1e-5)
    assert mdtraj.load(str(out), top=str(tmp_path / "md.pdb")).n_frames == 10
    summary = json.loads((tmp_path / "md.summary.json").read_text())
    assert (summary["replicas"], summary["frames_per_replica"], summary["frame_interval_ps"]) == (2, 5, 0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_commands_keep_freed_memory_unless_the_environment_sets_it(monkeypatch):
    from openmm_snf.cli import _MALLOPT, _keep_freed_memory
    for name in _MALLOPT:
        monkeypatch.delenv(name, raising=False)
    assert sorted(_keep_freed_memory()) == sorted(_MALLOPT)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # the user's choice stays
    assert _keep_freed_memory() == ["MALLOC_MMAP_THRESHOLD_"]


def test_umbrella_grid_over_two_dihedrals(tmp_path, capsys):
    """--cv phi psi: a 4 x 4 grid with replica exchange; the sidecar holds both biased CVs of every frame."""
    out = tmp_path / "grid.dcd"
    assert main(["--quiet", "umbrella", "alanine_dipeptide_vacuum", "--cv", "phi", "psi", "--windows", "4",
                 "--frames", "10", "--steps-per-frame", "10", "--equilibration", "50", "--k", "4",
                 "--timestep", "2", "--hydrogen-mass", "3", "--out", str(out)]) == 0
    assert "4 x 4 windows x 10" in capsys.readouterr().out
    summary = json.loads((tmp_path / "grid.summary.json").read_text())
    assert summary["cv"] == ["phi", "psi"] and summary["window_grid"] == [4, 4] and summary["windows"] == 16
    assert len(summary["exchange_acceptance"]) == 2 and all(0 <= r <= 1 for r in summary["exchange_acceptance"])
    assert np.shape(summary["neighbour_overlap"]) == (2, 16)
    sidecar = np.load(tmp_path / "grid.weights.npz")
    centers = sidecar["window_centers"]
    assert centers.shape == (16, 2) and list(sidecar["window_cvs"]) == ["phi", "psi"]
    assert np.allclose(centers[:4, 0], -np.pi) and np.allclose(centers[:4, 1], np.linspace(-np.pi, np.pi, 4, endpoint=False))
    import mdtraj
    traj = mdtraj.load(str(out), top=str(tmp_path / "grid.pdb"))
    angles = np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]])  # (2, 160)
    assert "u_kn" not in sidecar and list(sidecar["force_constants"]) == [4.0, 4.0]
    np.testing.assert_allclose(sidecar["window_cv_values"], angles, atol=1e-4)  # float32 DCD
    # frames stay near their windows' centres (std 0.5 rad at 4 kT/rad^2; uniform angles would give 1.8)
    assert (((angles - centers[sidecar["window"]].T + np.pi) % (2 * np.pi) - np.pi) ** 2).mean() ** 0.5 < 1.0
    assert np.isclose(np.logaddexp.reduce(sidecar["log_weights"]), 0.0)
    assert list(sidecar["window"]) == list(np.repeat(np.arange(16), 10))
    assert main(["report", "--samples", str(out)]) == 0
    assert (tmp_path / "grid-plots" / "overlap.png").is_file()
    for cvs, message in ((["phi", "psi", "phi"], "one or two dihedrals"), (["phi", "phi"], "distinct dihedrals")):
        capsys.readouterr()
        assert main(["umbrella", "alanine_dipeptide_vacuum", "--cv", *cvs, "--out", str(tmp_path / "x.dcd")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.dcd").exists()

"""Plots are written (atomically, never over an existing file) as non-empty PNGs; metrics logs are read tolerantly."""
import json

import numpy as np
import pytest
from matplotlib.image import imread

from openmm_snf.analysis import free_energy_profile
from openmm_snf.analysis.plots import (plot_free_energy_profile, plot_log_weights, plot_ramachandran,
                                       plot_training_curves, read_metrics)
from openmm_snf.io import InputError, OutputExistsError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > min_bytes
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _phi_psi(n, seed, centre=(-1.5, 2.5)):
    rng = np.random.default_rng(seed)
    return np.angle(np.exp(1j * (rng.normal(size=(n, 2)) * 0.5 + centre)))


def _write_metrics(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_training_curves_tolerate_missing_and_odd_keys(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"iteration": i, "loss": 5.0 / (i + 1), "ess": 0.1 * i, "phase": "ml"} for i in range(30)]
    records[3].pop("ess")
    records[4]["loss"] = float("nan")  # a skipped step
    records += [{"iteration": 30, "kl_loss": 0.5, "time_s": 1.0}]
    _write_metrics(log, [json.dumps(r) for r in records] + ['{"iteration": 31, "lo'])  # truncated last line
    assert len(read_metrics(log)) == 31
    out = plot_training_curves(log, tmp_path / "training.png")
    _assert_png(out)


def test_training_curves_bad_logs(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_metrics(log, ['{"iteration": 0, "loss": 1}', "garbage", '{"iteration": 2, "loss": 1}'])
    with pytest.raises(InputError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        plot_training_curves(log, tmp_path / "t.png")
    _write_metrics(log, ['{"iteration": 0, "phase": "ml"}'])
    with pytest.raises(InputError, match=r"no numeric metrics to plot \(keys seen: \['iteration', 'phase'\]\)"):
        plot_training_curves(log, tmp_path / "t.png")
    with pytest.raises(InputError, match=r"metrics log not found: .*missing\.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")
    assert not (tmp_path / "t.png").exists()


def test_ramachandran_three_panels(tmp_path):
    samples = _phi_psi(3000, 0)
    log_w = -0.5 * (samples[:, 0] + 1.5) ** 2
    out = plot_ramachandran(tmp_path / "rama.png", samples, log_w, reference=_phi_psi(3000, 1, (-1.2, 2.8)))
    _assert_png(out)
    assert imread(out).shape[1] > 2.5 * imread(out).shape[0]  # three panels side by side


def test_log_weights_and_profile_plots(tmp_path):
    rng = np.random.default_rng(2)
    log_w = rng.normal(size=2000)
    _assert_png(plot_log_weights(tmp_path / "logw.png", log_w))
    phi = _phi_psi(2000, 3)[:, 0]
    profile = free_energy_profile(phi, log_w, bins=40, n_bootstrap=50)
    reference = free_energy_profile(_phi_psi(2000, 4)[:, 0], None, bins=40, n_bootstrap=50)
    _assert_png(plot_free_energy_profile(tmp_path / "fes.png", profile, reference=reference))
    with pytest.raises(InputError, match="1-D profiles"):
        plot_free_energy_profile(tmp_path / "2d.png", free_energy_profile(_phi_psi(100, 5), None, n_bootstrap=0))
    with pytest.raises(InputError, match="finite"):
        plot_log_weights(tmp_path / "bad.png", np.array([0.0, np.nan]))


def test_existing_plot_is_kept_unless_forced(tmp_path):
    out = tmp_path / "logw.png"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match=r"output exists: .*logw\.png"):
        plot_log_weights(out, np.zeros(10))
    assert out.read_bytes() == b"keep me" and len(list(tmp_path.iterdir())) == 1
    plot_log_weights(out, np.zeros(10), force=True)
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(InputError, match=r"use a \.png file name"):
        plot_log_weights(tmp_path / "logw.pdf", np.zeros(10))


def test_training_curves_leave_out_bookkeeping_and_group_panels():
    from openmm_snf.analysis.plots import BOOKKEEPING, _numeric_series, _training_panels
    records = [{"iteration": i, "loss": 1.0 / (i + 1), "loss_forward": 1.0, "lr": 1e-3, "grad_norm": 2.0,
                "skipped": False, "n_skipped": 0, "elapsed_s": 0.1 * i, "ess_fraction": 0.2,
                "acceptance": {"mc1": 0.5, "mc2": 0.4}} for i in range(5)]
    records[-1]["val_loss"] = 0.9
    _, series = _numeric_series(records)
    assert not set(series) & set(BOOKKEEPING)
    panels = {title: (ylabel, lines) for title, ylabel, lines in _training_panels(series)}
    assert list(panels) == ["loss", "Kish ESS of a monitoring batch", "Metropolis acceptance"]
    assert set(panels["loss"][1]) == {"loss", "loss_forward", "val_loss"} and "nats" in panels["loss"][0]
    np.testing.assert_allclose(panels["Kish ESS of a monitoring batch"][1]["ess"][1], 20.0)  # in percent
    assert set(panels["Metropolis acceptance"][1]) == {"mc1", "mc2"}


def test_log_weight_histogram_is_clipped_to_the_top_nats(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    seen = {}
    original = Axes.hist

    def spy(self, x, *args, **kwargs):
        seen["values"], seen["range"] = np.asarray(x), kwargs.get("range")
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(Axes, "hist", spy)
    log_w = np.concatenate([np.random.default_rng(0).normal(size=1000), [-7e6, -300.0]])
    _assert_png(plot_log_weights(tmp_path / "logw.png", log_w))
    assert seen["range"][0] == -50.0 and seen["values"].size == 1000 and seen["values"].min() >= -50


def test_convergence_and_energy_plots(tmp_path):
    from openmm_snf.analysis.plots import plot_convergence, plot_energy_histogram
    rng = np.random.default_rng(5)
    x = rng.normal(size=3000)
    log_w = -0.5 * x
    _assert_png(plot_convergence(tmp_path / "conv.png", log_w, x > 1, x < 1, labels=("x>1", "x<1"),
                                 reference_delta_f=1.0))
    u = 0.5 * x ** 2
    _assert_png(plot_energy_histogram(tmp_path / "u.png", u, log_w, reference=0.5 * rng.normal(size=2000) ** 2))
    with pytest.raises(InputError, match="one equal length"):
        plot_convergence(tmp_path / "bad.png", log_w, x[:10] > 0, x < 0)


def test_overlap_matrix_plot(tmp_path):
    from openmm_snf.analysis.plots import plot_overlap_matrix
    k = np.arange(8)
    matrix = np.exp(-np.minimum(np.abs(k[:, None] - k[None, :]), 8 - np.abs(k[:, None] - k[None, :])) ** 2)
    matrix /= matrix.sum(1, keepdims=True)
    _assert_png(plot_overlap_matrix(tmp_path / "overlap.png", matrix, centers=np.linspace(-np.pi, np.pi, 8, False)))
    with pytest.raises(InputError, match="square"):
        plot_overlap_matrix(tmp_path / "bad.png", matrix[:3])


def test_state_bars_map_the_delta_f_interval_to_shares(tmp_path):
    from openmm_snf.analysis import free_energy_difference
    from openmm_snf.analysis.plots import plot_state_free_energies, state_shares
    shares = state_shares(np.log(3.0), 0.0, np.log(9.0))  # P_B = 3 P_A, interval P_B/P_A in [1, 9]
    np.testing.assert_allclose(shares["A"], [0.25, 0.1, 0.5])
    np.testing.assert_allclose(shares["B"], [0.75, 0.5, 0.9])
    x = np.random.default_rng(1).normal(size=4000)
    result = free_energy_difference(np.zeros(4000), x > 1, x < 1, labels=("x>1", "x<1"), kT=2.5, n_bootstrap=100)
    _assert_png(plot_state_free_energies(tmp_path / "states.png", result))


def test_weighted_reference_frames_are_read_with_their_weights(tmp_path):
    from openmm_snf.analysis.plots import plot_energy_histogram
    from openmm_snf.analysis.report import _read_reference
    from openmm_snf.io import write_trajectory, write_weighted_trajectory
    from openmm_snf.systems import load_system
    mol = load_system("double_well")
    xyz = np.random.default_rng(0).normal(size=(20, 1, 3))
    write_weighted_trajectory(tmp_path / "tempering.dcd", mol, xyz, np.arange(20.0), np.zeros(20))
    write_trajectory(tmp_path / "md.dcd", mol, xyz)
    traj, log_w = _read_reference(tmp_path / "tempering.dcd")
    assert traj.n_frames == 20 and np.allclose(log_w, np.arange(20.0))
    assert _read_reference(tmp_path / "md.dcd")[1] is None and _read_reference(None) == (None, None)
    u = 0.5 * (xyz[:, 0, 0] ** 2)
    _assert_png(plot_energy_histogram(tmp_path / "u.png", u, np.zeros(20), reference=u,
                                      reference_log_weights=np.arange(20.0), reference_label="tempering"))

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

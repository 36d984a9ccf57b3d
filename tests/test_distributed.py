"""Data-parallel training and sampling over torch.distributed (gloo, 2 CPU processes).

A W-rank run must equal a single process with ``n_shards = W`` (same seed, same global batch) up to
floating-point reduction order; a failing rank must stop every rank with an error and leave the last
checkpoint as it was.
"""
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

from openmm_snf.distributed import (init_distributed, local_shards, run_on_main, shard_seed,
                                    shutdown_distributed, split_sizes)
from openmm_snf.train import TrainConfig, Trainer, load_checkpoint

WORLD = 2
TIMEOUT_S = 60  # the process group's timeout: a hang fails the test instead of blocking it
CONFIG = dict(n_iterations=6, batch_size=32, weight_forward=1.0, weight_reverse=0.5, seed=5, ess_every=2,
              learning_rate=3e-3, checkpoint_every=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _double_well_model(init_seed: int, device: str = "cpu"):
    """A small SNF on the OpenMM double well (1 particle, reduced energy = the formula); with a CUDA
    model, energies on OpenMM's fastest platform (the rank's GPU)."""
    from openmm_snf.energy import OpenMMEnergy
    from openmm_snf.flows import Reshape, build_snf
    from openmm_snf.systems import load_system
    energy = _FaultyEnergy(OpenMMEnergy(load_system("double_well"), platform="CPU" if device == "cpu" else None))
    torch.manual_seed(init_seed)
    return build_snf(3, None, energy, Reshape((1, 3)), n_blocks=2, hidden=(16, 16), stochastic="mc", n_steps=3,
                     step_size=0.3, target_acceptance=0.3).to(device)  # adaptive step sizes: buffers change


class _FaultyEnergy(torch.nn.Module):
    """The OpenMM energy, failing while ``fault()`` returns "raise" (an OpenMM error on one rank) or
    "exit" (the process vanishes, as after a segfault or an out-of-memory kill)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fault = inner, lambda: None

    def forward(self, x):
        fault = self.fault()
        if fault == "raise":
            raise RuntimeError("injected energy failure")
        if fault == "exit":
            os._exit(3)
        return self.inner(x)


def _data(n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 3, generator=gen, dtype=torch.float64)
    x[:, 0, 0] += torch.where(torch.rand(n, generator=gen) < 0.5, -1.7, 1.7)
    return x


def _train_worker(rank, folder, fault=None, fail_rank=1, fail_iteration=4, device="cpu"):
    """One rank: its own model init (rank 0's is broadcast), train, save this rank's parameters.
    With ``fault``, rank ``fail_rank`` fails inside the energy during iteration fail_iteration + 1."""
    import openmm
    from openmm_snf.distributed import cpu_thread_share
    share = cpu_thread_share(WORLD)  # this rank's share of the cores, for torch and OpenMM's CPU platform
    assert torch.get_num_threads() == share
    assert openmm.Platform.getPlatformByName("CPU").getPropertyDefaultValue("Threads") == str(share)
    snf = _double_well_model(100 + rank, device)
    trainer = Trainer(snf, TrainConfig(**CONFIG), data=_data(), checkpoint_path=f"{folder}/checkpoint.pt",
                      metrics_path=f"{folder}/metrics.jsonl", progress=False,
                      process_group=torch.distributed.group.WORLD)
    if fault is not None and rank == fail_rank:
        snf.target_energy.fault = lambda: fault if trainer.iteration == fail_iteration else None
    trainer.train()
    torch.save(snf.state_dict(), f"{folder}/rank{rank}.pt")


def _sample_worker(rank, folder, n, seed):
    from openmm_snf.runs import load_run
    from openmm_snf.sampling import sample
    run = load_run(f"{folder}/run")
    result = sample(run, n, seed=seed, batch_size=7, progress=False, process_group=torch.distributed.group.WORLD)
    assert (result is None) == (rank != 0)
    if rank == 0:
        np.savez(f"{folder}/gathered.npz", **{k: v for k, v in result.items() if k != "acceptance"})


def _entry(rank, port, status, target, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init_distributed(timeout_s=TIMEOUT_S)
        target(rank, *args)
        status.put((rank, "ok"))
    except BaseException as err:  # reported to the test, then the process exits non-zero
        status.put((rank, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        shutdown_distributed()
        sys.exit(1)
    shutdown_distributed()


def launch(target, *args) -> tuple[list[int], dict]:
    """Run ``target(rank, *args)`` on WORLD spawned processes; return (exit codes, {rank: 'ok' or error})."""
    context = multiprocessing.get_context("spawn")
    status, port = context.Queue(), _free_port()
    procs = [context.Process(target=_entry, args=(rank, port, status, target, args)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=3 * TIMEOUT_S)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, "a rank hung instead of exiting"
    messages = {}
    while not status.empty():
        rank, message = status.get()
        messages[rank] = message
    return [proc.exitcode for proc in procs], messages


def test_split_sizes_and_shard_streams():
    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="non-empty"):
        split_sizes(2, 3)
    assert local_shards(4, None) == [0, 1, 2, 3]
    assert shard_seed(7, 0, 1) == 7  # one shard: the seed itself, as single-process code always did
    seeds = {shard_seed(7, k, 4) for k in range(4)} | {shard_seed(8, k, 4) for k in range(4)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert run_on_main(lambda: 3, None) == 3


def test_shard_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="n_shards must be between 1 and batch_size"):
        TrainConfig(batch_size=4, n_shards=5)
    path = tmp_path / "checkpoint.pt"
    Trainer(_double_well_model(0), TrainConfig(**{**CONFIG, "n_iterations": 1}, n_shards=2), data=_data(),
            checkpoint_path=path, progress=False).train()
    resumed = Trainer(_double_well_model(0), TrainConfig(**CONFIG), data=_data(), checkpoint_path=path,
                      progress=False)
    assert resumed.n_shards == 2 and resumed.iteration == 1  # the checkpoint's shard count
    with pytest.raises(ValueError, match="holds 2 shard stream"):
        Trainer(_double_well_model(0), TrainConfig(**CONFIG, n_shards=4), data=_data(), checkpoint_path=path,
                progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.device_count() >= WORLD and torch.distributed.is_nccl_available()),
    reason="needs 2 CUDA devices and NCCL"))])
def test_two_ranks_train_like_one_process_with_two_shards(tmp_path, device):
    codes, messages = launch(_train_worker, str(tmp_path), None, 1, 4, device)
    assert codes == [0, 0], messages
    reference = _double_well_model(100, device)
    history = Trainer(reference, TrainConfig(**CONFIG, n_shards=WORLD), data=_data(), progress=False).train()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location=device) for r in range(WORLD)]
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt", map_location=device)
    assert checkpoint["iteration"] == CONFIG["n_iterations"] and len(checkpoint["generator_states"]) == WORLD
    assert float(reference.state_dict()["blocks.2.step_size"]) != 0.3
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)  # ranks agree exactly
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(checkpoint["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(1, CONFIG["n_iterations"] + 1))  # rank 0 alone wrote
    for mine, theirs in zip(lines, history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["ess_fraction"] == pytest.approx(theirs["ess_fraction"], rel=1e-6)
        assert mine["acceptance"] == pytest.approx(theirs["acceptance"], rel=1e-9)
    # a single process with one shard draws other random numbers: the definition matters
    other = _double_well_model(100, device)
    Trainer(other, TrainConfig(**CONFIG, n_shards=1), data=_data(), progress=False).train()
    assert any(not torch.allclose(a, b) for a, b in zip(other.state_dict().values(), reference.state_dict().values()))


def test_a_failing_rank_stops_all_and_keeps_the_last_checkpoint(tmp_path):
    codes, messages = launch(_train_worker, str(tmp_path), "raise")
    assert codes[0] != 0 and codes[1] != 0, messages
    assert "injected energy failure" in messages[1]
    assert "DistributedError" in messages[0] and "other rank(s) failed in iteration 5" in messages[0]
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["iteration"] == 4
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "rank0.pt").exists()
    # the checkpoint resumes like an uninterrupted run
    resumed = _double_well_model(999)
    Trainer(resumed, TrainConfig(**CONFIG), data=_data(), checkpoint_path=tmp_path / "checkpoint.pt",
            progress=False).train()
    straight = _double_well_model(100)
    Trainer(straight, TrainConfig(**CONFIG, n_shards=WORLD), data=_data(), progress=False).train()
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_crashed_rank_ends_the_others_with_an_error(tmp_path):
    codes, messages = launch(_train_worker, str(tmp_path), "exit")
    assert codes[1] == 3 and codes[0] != 0, messages
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 4
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "rank0.pt").exists()


def _cli_worker(rank, folder):
    """`openmm-snf train` (2 iterations), a copy of the run as 'one' (rank 0), `train --resume` to 4
    iterations, then `sample`, all with --distributed on every rank (the process group is already joined)."""
    from openmm_snf.cli import main
    assert main(["train", "double_well", "--out", f"{folder}/two", "--iterations", "2", "--data",
                 f"{folder}/data.dcd", "--distributed"]) == 0
    if rank == 0:  # the others wait for rank 0 inside the next command
        shutil.copytree(f"{folder}/two", f"{folder}/one")
    assert main(["train", "double_well", "--out", f"{folder}/two", "--resume", "--iterations", "4",
                 "--distributed"]) == 0
    assert main(["sample", f"{folder}/two", "--n", "45", "--batch-size", "10", "--seed", "4",
                 "--out", f"{folder}/two.dcd", "--distributed"]) == 0
    _sample_auto(main, f"{folder}/two", f"{folder}/two-auto.dcd", "--distributed")


def _sample_auto(main, run, out, *options):
    """`sample --n auto` in two rounds (first round shrunk to 20 samples, never judged hopeless), capped at 60
    samples."""
    from openmm_snf import sampling
    saved = sampling.FIRST_ROUND, sampling.HOPELESS_FACTOR
    sampling.FIRST_ROUND, sampling.HOPELESS_FACTOR = 20, 10**9
    try:
        assert main(["sample", run, "--n", "auto", "--max-n", "60", "--batch-size", "10", "--seed", "4",
                     "--anneal", "0", "--out", out, *options]) == 0
    finally:
        sampling.FIRST_ROUND, sampling.HOPELESS_FACTOR = saved


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """MD data; a 2-rank CLI run 'two' (trained, resumed, sampled to two.dcd); 'one', its checkpoint at
    iteration 2 resumed in this process, and one.dcd sampled from 'two' here with --shards 2.

    (Both runs continue one checkpoint: a fresh run's initial weights come from the process's global RNG.)
    """
    from openmm_snf.cli import main
    folder = tmp_path_factory.mktemp("cli")
    assert main(["md", "double_well", "--out", str(folder / "data.dcd"), "--frames", "50", "--replicas", "4",
                 "--steps-per-frame", "20", "--equilibration", "100"]) == 0
    codes, messages = launch(_cli_worker, str(folder))
    assert codes == [0, 0], messages
    assert main(["train", "double_well", "--out", str(folder / "one"), "--resume", "--iterations", "4"]) == 0
    assert main(["sample", str(folder / "two"), "--n", "45", "--batch-size", "10", "--seed", "4", "--out",
                 str(folder / "one.dcd"), "--shards", "2"]) == 0
    _sample_auto(main, str(folder / "two"), str(folder / "one-auto.dcd"), "--shards", "2")
    return folder


def _assert_same_samples(folder, a, b, n=45):
    import mdtraj
    one, two = np.load(folder / f"{a}.weights.npz"), np.load(folder / f"{b}.weights.npz")
    assert two["log_weights"].shape == (n,)
    np.testing.assert_allclose(two["reduced_energies"], one["reduced_energies"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two["log_weights"], one["log_weights"], rtol=1e-6, atol=1e-6)
    xyz_one = mdtraj.load(str(folder / f"{a}.dcd"), top=str(folder / f"{a}.pdb")).xyz
    xyz_two = mdtraj.load(str(folder / f"{b}.dcd"), top=str(folder / f"{b}.pdb")).xyz
    np.testing.assert_allclose(xyz_two, xyz_one, rtol=1e-5, atol=1e-6)


def test_cli_distributed_training_and_sampling_match_one_process(cli_runs):
    one = load_checkpoint(cli_runs / "one" / "checkpoint.pt")
    two = load_checkpoint(cli_runs / "two" / "checkpoint.pt")
    assert two["iteration"] == 4 and len(two["generator_states"]) == 2
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    lines = [json.loads(line) for line in (cli_runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3, 4]
    _assert_same_samples(cli_runs, "one", "two")  # shard 0's 23 samples, then shard 1's 22, from rank 0 alone
    _assert_same_samples(cli_runs, "one-auto", "two-auto", n=60)  # --n auto: rounds of 20 and 40 on 2 ranks
    assert json.loads((cli_runs / "two-auto.summary.json").read_text())["n_auto"]["stopped"].endswith(
        "stopped at --max-n 60")
    assert not list(cli_runs.glob("*.tmp")) and not list((cli_runs / "two").glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_launches_distributed_sampling(cli_runs):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    # '--' ends torchrun's own options: it would take '--n' for an abbreviation of its '--nnodes'
    command = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "openmm_snf.cli", "--",
               "sample", str(cli_runs / "two"), "--n", "45", "--batch-size", "10", "--seed", "4",
               "--out", str(cli_runs / "torchrun.dcd"), "--distributed", "--dist-timeout", str(TIMEOUT_S)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3 * TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 45 samples") == 1  # rank 0 alone reports and writes
    _assert_same_samples(cli_runs, "one", "torchrun")


def test_distributed_flag_without_torchrun_is_a_clear_error(tmp_path, capsys):
    from openmm_snf.cli import main
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "x.dcd"), "--distributed"]) == 2
    assert "torchrun" in capsys.readouterr().err

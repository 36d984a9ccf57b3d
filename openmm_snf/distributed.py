"""Data parallelism with torch.distributed: process setup, shards of work, deterministic gathers.

A distributed job is launched by ``torchrun`` (one process per rank; it sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT). :func:`init_distributed` joins the
process group and gives this process its share of the node: CUDA device ``LOCAL_RANK`` for torch and
for OpenMM Contexts (CUDA/OpenCL ``DeviceIndex``), and cores // ranks-per-node CPU threads for torch
and OpenMM's CPU platform. Collectives on CPU tensors use gloo, on CUDA tensors NCCL.

**Shards** make results independent of the number of ranks. Work of size N (a training batch, a
sampling campaign) is cut into ``n_shards`` pieces (:func:`split_sizes`); shard k draws its random
numbers from its own generator seeded with :func:`shard_seed` ``(seed, k, n_shards)`` and is computed
by rank ``k % world_size``. Pieces are gathered in shard order. So a job with ``n_shards = S``
gives the same result on 1, 2, ... or S ranks (S divisible by the rank count) up to the order of
floating-point reductions, and single-process code with ``n_shards = 1`` is unchanged (its
generator is seeded with ``seed`` itself).

**Failures**: every collective has the process group's timeout (default 30 minutes, long enough for
rank 0 to make MD training data while the others wait), so a rank that stops answering ends the
others with an error instead of a hang; :func:`run_on_main` passes an exception of rank 0 to all
ranks as :class:`DistributedError`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .energy.platforms import set_process_defaults

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "DistributedSetup", "init_distributed", "shutdown_distributed",
           "distributed_session", "cpu_thread_share", "split_sizes", "shard_seed", "local_shards",
           "rank_of", "world_size_of", "run_on_main", "broadcast_from_main", "gather_in_order", "broadcast_module",
           "sum_gradients", "check_same_on_all_ranks"]

DEFAULT_TIMEOUT_S = 1800.0
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree; this rank stops without writing anything."""


@dataclass(frozen=True)
class DistributedSetup:
    """This process's place in a distributed job.

    Attributes:
        rank, world_size: global rank and number of ranks.
        local_rank, local_world_size: rank and number of ranks on this node.
        device: torch device of this rank (``cuda:<local_rank>`` when torch sees CUDA, else cpu).
        threads: CPU threads given to torch and to OpenMM's CPU platform in this process.
        backend: the torch.distributed backend string.
        group: the process group (the default, world group).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    threads: int
    backend: str
    group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_thread_share(local_world_size: int) -> int:
    """CPU threads per rank: the cores this process may use divided by the ranks on this node (>= 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    return int(value)


def init_distributed(*, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedSetup:
    """Join the process group described by torchrun's environment and pin this rank to its device and threads.

    Args:
        backend: torch.distributed backend; None: "cpu:gloo,cuda:nccl" when torch sees CUDA (CPU tensors
            use gloo, CUDA tensors NCCL), else "gloo".
        timeout_s: seconds any collective may wait for the other ranks before raising.

    If this process already belongs to a default process group, that group is used as it is.
    Raises ValueError when the torchrun variables are missing (the process was not launched by torchrun).
    """
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment set by torchrun ({', '.join(missing)} missing); "
                         "launch with 'torchrun --nproc-per-node N -m openmm_snf.cli COMMAND ... --distributed'")
    if not timeout_s > 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    threads = cpu_thread_share(local_world_size)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    set_process_defaults(threads=threads, device_index=device.index if device.type == "cuda" else local_rank)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    backend = str(dist.get_backend())
    return DistributedSetup(rank, world_size, local_rank, local_world_size, device, threads, backend,
                            dist.group.WORLD)


def shutdown_distributed() -> None:
    """Leave the process group (no-op when none is initialized)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(**kwargs):
    """``with distributed_session() as setup:`` :func:`init_distributed`, then shut down the process group
    if this session created it (a group that already existed is joined and left running)."""
    created = not dist.is_initialized()
    setup = init_distributed(**kwargs)
    try:
        yield setup
    finally:
        if created:
            shutdown_distributed()


def rank_of(group) -> int:
    """Rank of this process in ``group`` (0 when group is None: a single process)."""
    return 0 if group is None else dist.get_rank(group)


def world_size_of(group) -> int:
    """Ranks in ``group`` (1 when group is None)."""
    return 1 if group is None else dist.get_world_size(group)


def split_sizes(n: int, parts: int) -> list[int]:
    """Split ``n`` items into ``parts`` contiguous pieces, the first ``n % parts`` one larger."""
    if parts < 1 or n < parts:
        raise ValueError(f"cannot split {n} items into {parts} non-empty shards")
    base, extra = divmod(n, parts)
    return [base + (k < extra) for k in range(parts)]


def shard_seed(seed: int, shard: int, n_shards: int) -> int:
    """Seed of shard ``shard``'s generator: ``seed`` itself for a single shard, else derived from
    (seed, shard) by numpy's SeedSequence (independent streams, 63-bit)."""
    if n_shards == 1:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(shard)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def local_shards(n_shards: int, group) -> list[int]:
    """The shards computed by this rank: k with k % world_size == rank (n_shards must be a multiple
    of the world size so that ranks get equal work)."""
    world, rank = world_size_of(group), rank_of(group)
    if n_shards < 1 or n_shards % world:
        raise ValueError(f"n_shards ({n_shards}) must be a positive multiple of the number of ranks ({world})")
    return list(range(rank, n_shards, world))


def run_on_main(fn, group):
    """Call ``fn()`` on rank 0 only; return its result there (None elsewhere).

    If it raises, rank 0 re-raises after telling the others, which raise :class:`DistributedError`
    naming the error (so no rank waits for a rank 0 that gave up).
    """
    if group is None:
        return fn()
    result, failure = None, [None]
    if rank_of(group) == 0:
        try:
            result = fn()
        except Exception as err:
            failure = [f"{type(err).__name__}: {err}"]
            dist.broadcast_object_list(failure, src=0, group=group)
            raise
    dist.broadcast_object_list(failure, src=0, group=group)
    if failure[0] is not None:
        raise DistributedError(f"rank 0 failed: {failure[0]}")
    return result


def broadcast_from_main(obj, group):
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def gather_in_order(obj, group) -> list | None:
    """Gather one picklable object per rank on rank 0, as a list in rank order (None on other ranks)."""
    if group is None:
        return [obj]
    out = [None] * world_size_of(group) if rank_of(group) == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0), group=group)
    return out


def broadcast_module(module: torch.nn.Module, group) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's values (in place)."""
    if group is None:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src, group=group)


def sum_gradients(parameters: list, stats: torch.Tensor, group) -> torch.Tensor:
    """Sum the gradients of ``parameters`` and a float64 vector ``stats`` over the ranks, in one all-reduce.

    A parameter without gradient counts as zero; it keeps ``grad = None`` only if it has none on every
    rank (so the optimizer treats it as a single process would). Gradients are summed in float64 and
    written back in the parameter's dtype. Returns the summed ``stats``.
    """
    device = stats.device
    grads = [p.grad.detach().reshape(-1).to(device, torch.float64) if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in parameters]
    present = torch.tensor([float(p.grad is not None) for p in parameters], dtype=torch.float64, device=device)
    flat = torch.cat(grads + [present, stats.to(torch.float64)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset, present = 0, flat[-len(stats) - len(parameters):len(flat) - len(stats)]
    for p, has_grad in zip(parameters, present.tolist()):
        summed = flat[offset:offset + p.numel()]
        p.grad = summed.view(p.shape).to(p.device, p.dtype).clone() if has_grad else None
        offset += p.numel()
    return flat[len(flat) - len(stats):]


def check_same_on_all_ranks(value, group, what: str) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold an equal ``value``."""
    if group is None:
        return
    values = [None] * world_size_of(group)
    dist.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        raise DistributedError(f"the ranks disagree on {what}: {values} (start every rank with the same "
                               "arguments and files)")

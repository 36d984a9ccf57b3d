"""One training iteration accumulated over the shards of the batch and the ranks of a process group.

The global batch of B samples is cut into ``n_shards`` shards (sizes differ by at most one), shard k
drawn with its own generator (``distributed.shard_seed(seed, k, n_shards)``); a rank runs its own
shards (a single process all of them). Each shard's loss is backpropagated weighted by its share of
the batch, so the summed gradients are those of the batch mean, and its statistics are added into an
:class:`IterationStatistics`: named float64 fields packed in one vector, so that one all-reduce sums
the gradients and all statistics over the ranks. Buffers that a training pass changes (adaptive
Metropolis step sizes) restart from the iteration's values in every shard and become the shards'
mean weighted by their share of the batch (a single shard keeps its own exactly).
"""
from __future__ import annotations

import torch

from ..distributed import (DistributedError, gather_in_order, local_shards, shard_seed, split_sizes,
                           sum_gradients)

__all__ = ["IterationStatistics", "Shards"]


class IterationStatistics:
    """Named float64 fields of one iteration in one vector; ``stats[name]`` is a view of its field.

    Fields: ``loss``, ``forward``, ``reverse`` (the share-weighted loss and its two terms),
    ``n_nonfinite`` (shards whose loss was not finite), ``n_failed`` (ranks that raised), and when the
    iteration samples, ``log_weights`` (B, in shard order) and ``acceptance`` (share-weighted, one per
    acceptance key); last ``buffers``, the model's floating-point buffers flattened.
    """

    def __init__(self, sizes: dict, device):
        self.slices, offset = {}, 0
        for name, size in sizes.items():
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.vector = torch.zeros(offset, dtype=torch.float64, device=device)

    @classmethod
    def for_iteration(cls, batch_size: int, acceptance_keys: list, sampled: bool, buffers: list, device):
        sizes = dict(loss=1, forward=1, reverse=1, n_nonfinite=1, n_failed=1)
        if sampled:
            sizes.update(log_weights=batch_size, acceptance=len(acceptance_keys))
        sizes["buffers"] = sum(b.numel() for b in buffers)
        return cls(sizes, device)

    def __contains__(self, name: str) -> bool:
        return name in self.slices

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vector[self.slices[name]]

    def __setitem__(self, name: str, value) -> None:
        self.vector[self.slices[name]] = value

    def scalar(self, name: str) -> float:
        return float(self[name][0])


def float_buffers(module: torch.nn.Module) -> list:
    """The module's floating-point buffers: state a training pass may change (adaptive MC step sizes)."""
    return [b for b in module.buffers() if b.is_floating_point()]


class Shards:
    """The batch cut into shards, with a generator for each shard of this rank.

    Args:
        batch_size, n_shards, seed: define the shards and their streams (the same on every rank).
        group: a torch.distributed process group, or None for a single process.
        device: where the generators and statistics live.
    """

    def __init__(self, batch_size: int, n_shards: int, seed: int, group, device):
        self.batch_size, self.n_shards, self.group, self.device = batch_size, n_shards, group, device
        self.sizes = split_sizes(batch_size, n_shards)
        self.generators = {k: torch.Generator(device=device).manual_seed(shard_seed(seed, k, n_shards))
                           for k in local_shards(n_shards, group)}

    def generator_states(self) -> list | None:
        """Every shard's generator state in shard order, gathered from the ranks (collective); None off
        rank 0."""
        parts = gather_in_order({k: g.get_state() for k, g in self.generators.items()}, self.group)
        if parts is None:
            return None
        states = {k: state for part in parts for k, state in part.items()}
        return [states[k] for k in range(self.n_shards)]

    def set_generator_states(self, states: list) -> None:
        for k, generator in self.generators.items():
            generator.set_state(states[k].to("cpu"))

    def accumulate(self, module: torch.nn.Module, shard_loss, acceptance_keys: list, sampled: bool,
                   iteration: int) -> IterationStatistics:
        """Gradients of the batch in ``p.grad`` of ``module``'s parameters and the iteration's statistics,
        summed over the ranks; the buffers are set to the shards' weighted mean.

        ``shard_loss(n, generator)`` returns (loss, forward term, reverse term, SNFSample or None) of one
        shard; it samples exactly when ``sampled``. Distributed: an exception on any rank is raised on
        every rank before the step is applied (the failing rank re-raises its own).
        """
        buffers = float_buffers(module)
        if self.group is None:
            stats = self._local(buffers, shard_loss, acceptance_keys, sampled)
        else:
            error = None
            try:
                stats = self._local(buffers, shard_loss, acceptance_keys, sampled)
            except Exception as err:  # reported to the other ranks, then re-raised below
                error = err
                stats = IterationStatistics.for_iteration(self.batch_size, acceptance_keys, sampled, buffers,
                                                          self.device)
                stats["n_failed"] = 1
            stats.vector = sum_gradients(list(module.parameters()), stats.vector, self.group)
            n_failed = int(stats.scalar("n_failed"))
            if n_failed > 0:
                if error is not None:
                    raise error
                raise DistributedError(f"{n_failed} other rank(s) failed in iteration {iteration + 1}; "
                                       "stopping before the step (the last checkpoint is intact)")
        offset = 0
        for buffer in buffers:
            buffer.copy_(stats["buffers"][offset:offset + buffer.numel()].view(buffer.shape))
            offset += buffer.numel()
        return stats

    def _local(self, buffers: list, shard_loss, acceptance_keys: list, sampled: bool) -> IterationStatistics:
        """This rank's shards backpropagated and their statistics (other ranks' shards left at zero)."""
        stats = IterationStatistics.for_iteration(self.batch_size, acceptance_keys, sampled, buffers, self.device)
        start = [b.clone() for b in buffers]
        offsets = [sum(self.sizes[:k]) for k in range(self.n_shards)]
        for k, generator in self.generators.items():
            size, share = self.sizes[k], self.sizes[k] / self.batch_size
            for buffer, value in zip(buffers, start):
                buffer.copy_(value)
            loss, forward, reverse, sample = shard_loss(size, generator)
            for name, value in (("loss", loss), ("forward", forward), ("reverse", reverse)):
                stats[name] += share * torch.as_tensor(value).detach().to(stats.vector)
            if torch.isfinite(loss):
                (share * loss).backward()
            else:
                stats["n_nonfinite"] += 1
            if sample is not None:
                stats["log_weights"][offsets[k]:offsets[k] + size] = sample.log_weights
                stats["acceptance"] += share * torch.tensor([sample.acceptance[key] for key in acceptance_keys],
                                                            dtype=torch.float64, device=self.device)
            if buffers:
                stats["buffers"] += share * torch.cat([b.detach().reshape(-1).to(stats.vector) for b in buffers])
        return stats

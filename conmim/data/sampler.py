"""Which images each worker sees: per epoch one permutation from (seed, epoch), cut into global
batches; each worker takes its contiguous slice. The global batches do not depend on the number
of workers, so neither do the results."""
from __future__ import annotations

import numpy as np
import torch


class ShardedBatches(torch.utils.data.Sampler):
    """Per epoch: a permutation from (seed, epoch), cut into global batches of ``global_batch``;
    worker ``rank`` gets its contiguous slice of each global batch. The global batches are the
    same for any number of workers, so results do not depend on the worker count."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int,
                 shuffle: bool = True, drop_last: bool = True):
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.epoch, self.shuffle, self.drop_last = seed, epoch, shuffle, drop_last

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        stop = (self.n // self.gb) * self.gb if self.drop_last else self.n
        return [order[i: min(i + self.gb, stop)] for i in range(0, stop, self.gb)]

    def __len__(self) -> int:
        return len(self.global_batches())

    def __iter__(self):
        for g in self.global_batches():
            per = -(-len(g) // self.world)
            yield self.epoch, g[self.rank * per: (self.rank + 1) * per]


class EpochsOfBatches(torch.utils.data.Sampler):
    """The items of :class:`ShardedBatches` for epochs ``start`` .. ``stop - 1``, one epoch after
    the other: one DataLoader, whose worker processes live for the whole run and prefetch across
    the end of an epoch, instead of a new one (and new processes) per epoch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.epochs = [ShardedBatches(n, global_batch, rank, world, seed, e) for e in range(start, stop)]

    def __len__(self) -> int:
        return sum(len(e) for e in self.epochs)

    def __iter__(self):
        for e in self.epochs:
            yield from e


class BatchDataset(torch.utils.data.Dataset):
    """Maps an (epoch, indices) item of :class:`ShardedBatches` to a ready batch via ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, item):
        epoch, index = item
        return self.fn(epoch, index)

    def __len__(self):  # pragma: no cover - sampler drives iteration
        raise TypeError


def batches(fn, sampler, num_workers: int = 0, pin_memory: bool = False):
    """Batches ``fn(epoch, indices)`` for the items of ``sampler``, made by ``num_workers`` processes
    (0: in this one), each prefetching a few batches ahead. ``pin_memory`` (for a GPU): page-locked
    batches, so that ``.to(device, non_blocking=True)`` overlaps the copy with the step."""
    return torch.utils.data.DataLoader(BatchDataset(fn), sampler=sampler, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers else None)


"""Deterministic, resumable, distributed sampling.

``ResumableSampler`` yields ``(index, item_seed)`` pairs. The order of an epoch is a permutation
drawn from ``(seed, epoch)`` and each item's augmentation seed from ``(seed, epoch, position)``
(its position in the whole epoch, the same at any number of processes),
so a run restarted at (epoch, step) sees exactly the batches and crops the uninterrupted run saw,
with any number of DataLoader workers. Like ``DistributedSampler``, each of ``world_size``
processes takes every world_size-th index of the (padded) epoch, so ``--batch_size`` is per
process.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Sampler

_MASK = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


class ResumableSampler(Sampler):
    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0
        per_rank = math.ceil(n / world_size)
        if drop_last and per_rank >= batch_size:
            self.batches_per_epoch = per_rank // batch_size
        else:
            self.batches_per_epoch = math.ceil(per_rank / batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at batch ``start_batch`` (used when resuming in the middle of an epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world_size) * self.world_size
        order = (order * math.ceil(total / self.n))[:total]  # pad by repeating, like DistributedSampler
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        mine = self._order()
        # a tiny dataset still gives one full batch per epoch (repeating items) so drop_last never
        # empties it; without drop_last (evaluation) every item is seen once, never repeated (a
        # padded test split would count 4 images as 16 and change FID)
        if self.drop_last and len(mine) < self.batch_size:
            mine = (mine * math.ceil(self.batch_size / len(mine)))[: self.batch_size]
        count = self.batches_per_epoch * self.batch_size
        # the item's seed from its position in the whole (padded) epoch, rank + pos * world_size, not
        # in this process's share: an item gets the same crop / flip at any process count (N
        # processes at batch b see the batches one process at N * b sees, item for item; one
        # process: (seed, epoch, 0, pos), as ever)
        for pos in range(self.start_batch * self.batch_size, min(count, len(mine))):
            yield mine[pos], mix(self.seed, self.epoch, 0, self.rank + pos * self.world_size)

    def __len__(self) -> int:
        count = self.batches_per_epoch * self.batch_size
        if not self.drop_last:
            count = min(count, math.ceil(self.n / self.world_size))
        return max(0, count - self.start_batch * self.batch_size)


class SeededDataset(Dataset):
    """Base for ganengine datasets: ``ds[i]`` or ``ds[(i, item_seed)]`` -> dict of tensors/paths."""

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def get(self, index: int, g: torch.Generator) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, item_seed = key
        else:
            index, item_seed = int(key), mix(0x5EED, int(key))
        return self.get(int(index), torch.Generator().manual_seed(int(item_seed)))

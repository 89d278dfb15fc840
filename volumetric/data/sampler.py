"""EpochSampler: the shuffled order of one epoch, fixed by (seed, epoch), resumable mid-epoch, and
split into equal shards when several processes train together. BalancedEpochSampler: the same, but
each epoch's items are drawn with replacement so that every class appears equally often."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Yields this process's share of a permutation of range(n) drawn from (seed, epoch).

    One process (``num_replicas=1``): the permutation itself, less its first ``start`` items.

    Several processes: every rank draws the same permutation, drops the first ``start`` items (the
    part of the epoch that is done, counted over all ranks), pads the rest to a multiple of
    ``num_replicas`` by repeating items from the start of the permutation (as DistributedSampler
    does, so that every rank runs the same number of batches), and takes every ``num_replicas``-th
    item from position ``rank``. The shards are disjoint but for the padding and together cover
    the rest of the epoch. Rank r at its k-th item sits at position ``k * num_replicas + r`` of the
    epoch, so ``start = k * num_replicas`` continues exactly where each rank stopped after k items.

    A run resumed in the middle of an epoch sees exactly the items an uninterrupted run would have
    seen next. Set ``epoch`` and ``start`` before iterating.
    """

    def __init__(self, n: int, seed: int, *, num_replicas: int = 1, rank: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.n, self.seed = n, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def generator(self) -> torch.Generator:
        """The epoch's random stream, from (seed, epoch) alone: the same on every rank and run."""
        return torch.Generator().manual_seed(self.seed * 100_019 + self.epoch)

    def order(self) -> list[int]:
        """The whole epoch's permutation, the same on every rank."""
        return torch.randperm(self.n, generator=self.generator()).tolist()

    def shard(self) -> list[int]:
        """The items this rank yields, in order."""
        order = self.order()
        rest = order[min(self.start, self.n) :]
        if self.num_replicas == 1:
            return rest
        padding = -len(rest) % self.num_replicas
        if rest and padding:
            rest += (order * (padding // len(order) + 1))[:padding]
        return rest[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard())

    def __len__(self) -> int:
        rest = max(self.n - self.start, 0)
        return -(-rest // self.num_replicas)


class BalancedEpochSampler(EpochSampler):
    """An `EpochSampler` whose epoch is ``n`` indices drawn with replacement, item i with weight
    1 / (training items of i's class), so that each class makes up 1 / (number of classes) of an
    epoch in expectation: minority items recur within an epoch, majority items are left out of
    some epochs. Only `order` differs; the draw comes from the same (seed, epoch) stream, so
    resuming with ``start`` and the padded, strided shards of several processes work as for the
    shuffled epoch. Augmentation is seeded by (seed, epoch, index) (see `EpochKeys`), so an item
    drawn twice in one epoch gets the same random view both times; other epochs give other views.

    ``labels``: the class index of each training item, in data set order.
    """

    def __init__(self, labels: list[int], seed: int, *, num_replicas: int = 1, rank: int = 0):
        super().__init__(len(labels), seed, num_replicas=num_replicas, rank=rank)
        label_tensor = torch.as_tensor(labels, dtype=torch.int64)  # (n,)
        counts = torch.bincount(label_tensor).to(torch.float64)  # (classes,)
        self.weights = (1.0 / counts)[label_tensor] if len(labels) else counts  # (n,)

    def order(self) -> list[int]:
        """The epoch's ``n`` draws, the same on every rank."""
        if self.n == 0:
            return []
        draws = torch.multinomial(
            self.weights, self.n, replacement=True, generator=self.generator()
        )
        return draws.tolist()


def strided_shard(n: int, rank: int, num_replicas: int) -> list[int]:
    """Items rank, rank + num_replicas, ... of range(n): disjoint shards, no padding, together all of
    range(n) exactly once (for validation, where a repeated scan would count twice)."""
    return list(range(rank, n, num_replicas))


class EpochKeys(Sampler[tuple[int, int]]):
    """The items of an `EpochSampler` as (index, epoch) keys: the epoch travels with each index to
    the DataLoader worker that loads it, where augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((index, epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

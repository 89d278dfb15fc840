"""EpochSampler: the shuffled order of one epoch, fixed by (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Yields a permutation of range(n) drawn from (seed, epoch), skipping its first ``start`` items.

    A run resumed in the middle of an epoch sees exactly the items an uninterrupted run would have
    seen next. Set ``epoch`` and ``start`` before iterating.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.start = 0, 0

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_019 + self.epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.n - self.start

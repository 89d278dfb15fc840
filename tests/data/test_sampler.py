"""volumetric.data.sampler: the shuffled epoch stays the (seed, epoch) permutation it always was, and
the class-balanced epoch (draws with replacement) gives each class an equal share, resumes exactly
mid-epoch and splits into the same padded, strided shards across processes."""

from __future__ import annotations

import pytest
import torch

from volumetric.data.sampler import BalancedEpochSampler, EpochSampler

NINE_TO_ONE = [0] * 90 + [1] * 10  # 100 items, one positive in ten
THREE_CLASSES = [0] * 70 + [1] * 20 + [2] * 10
EPOCHS = 200  # x 100 items: 20,000 draws per label set


def class_shares(labels: list[int], seed: int = 0) -> torch.Tensor:
    """The share of each class among the items of EPOCHS epochs of the balanced sampler."""
    sampler = BalancedEpochSampler(labels, seed)
    drawn = []
    for epoch in range(EPOCHS):
        sampler.epoch = epoch
        drawn += [labels[i] for i in sampler]
    counts = torch.bincount(torch.tensor(drawn), minlength=max(labels) + 1)
    return counts / counts.sum()


# ------------------------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("seed, epoch", [(0, 0), (0, 7), (3, 2)])
def test_shuffle_order_is_the_seeded_permutation_it_always_was(seed, epoch):
    sampler = EpochSampler(23, seed)
    sampler.epoch = epoch
    expected = torch.randperm(23, generator=torch.Generator().manual_seed(seed * 100_019 + epoch))
    assert sampler.order() == expected.tolist()  # bit-identical to the sampler before this option
    assert sorted(sampler) == list(range(23))  # a permutation: every item once


# ------------------------------------------------------------------------------------------ balanced


@pytest.mark.parametrize("labels", [NINE_TO_ONE, THREE_CLASSES], ids=["9:1", "70:20:10"])
def test_balanced_sampler_gives_every_class_an_equal_share(labels):
    """The draws are independent, each of class c with probability 1/C, so a class's share over
    20,000 draws has standard deviation sqrt(p(1 - p) / 20,000) <= 0.0036 (p = 1/2 or 1/3); 0.02 is
    more than 5.5 standard deviations (a false failure about once in 10^7 seeds), yet far below
    the imbalance it corrects (0.1 vs 0.5, or 0.1 vs 0.33)."""
    shares = class_shares(labels)
    n_classes = len(set(labels))
    assert torch.allclose(shares, torch.full((n_classes,), 1 / n_classes), atol=0.02), shares


def test_balanced_epoch_has_n_draws_with_repeats_and_is_seeded():
    sampler = BalancedEpochSampler(NINE_TO_ONE, seed=4)
    sampler.epoch = 3
    order = sampler.order()
    assert len(order) == len(sampler) == 100 and all(0 <= i < 100 for i in order)
    assert len(set(order)) < 100  # with replacement: positives recur, some negatives are left out
    again = BalancedEpochSampler(NINE_TO_ONE, seed=4)
    again.epoch = 3
    assert again.order() == order  # (seed, epoch) alone fix the epoch: a resumed run sees the same
    again.epoch = 4
    assert again.order() != order


def test_balanced_sampler_with_equal_classes_weighs_items_equally():
    sampler = BalancedEpochSampler([0, 1, 1, 0, 2, 2], seed=0)
    assert torch.allclose(sampler.weights, torch.full((6,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_balanced_mid_epoch_start_continues_every_shard(world):
    """start = items done over all processes: each rank goes on from its own k-th item."""
    labels = NINE_TO_ONE[:15] + [1] * 2  # 17 items, not a multiple of 2 or 3
    for k in range(7):
        for rank in range(world):
            fresh = BalancedEpochSampler(labels, seed=1, num_replicas=world, rank=rank)
            resumed = BalancedEpochSampler(labels, seed=1, num_replicas=world, rank=rank)
            fresh.epoch = resumed.epoch = 5
            resumed.start = k * world
            assert list(resumed) == list(fresh)[k:]
            assert len(resumed) == len(fresh) - k


@pytest.mark.parametrize("n", [1, 3, 15, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_balanced_shards_are_disjoint_and_cover_the_epoch(n, world):
    """Positions rank::world of the epoch's draws: disjoint but for the padding, together the epoch."""
    labels = [int(i % 3 == 0) for i in range(n)]
    samplers = [BalancedEpochSampler(labels, 5, num_replicas=world, rank=r) for r in range(world)]
    for sampler in samplers:
        sampler.epoch = 3
    order = samplers[0].order()
    shards = [s.shard() for s in samplers]
    assert all(len(shard) == len(s) == -(-n // world) for shard, s in zip(shards, samplers))
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
    assert interleaved[:n] == order  # every draw of the epoch exactly once, in order
    padding = interleaved[n:]
    assert len(padding) == -n % world
    assert padding == (order * world)[: len(padding)]  # repeated from the start of the epoch

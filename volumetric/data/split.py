"""Seeded, stratified train/validation split."""

from __future__ import annotations

import random


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): about ``fraction`` of each class goes to validation, at least one where
    the class has two or more samples. The same labels and seed always give the same split."""
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        n_val = round(len(members) * fraction) if fraction > 0 else 0
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)

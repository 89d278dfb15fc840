"""Seeded, stratified train/validation split, kept whole per group; hashed training groups.

A group is what scans must not be split across, e.g. a patient: the manifest's ``group`` column.
Without groups every scan is split on its own (`stratified_split`). With groups, whole groups are
assigned (`grouped_split`), so that no patient has scans on both sides; a scan without a group is
a group of its own.

Checkpoints record the training split's groups as salted SHA-256 hashes (`hash_groups`), so that
evaluation can tell when a test scan's group was trained on (`hashed_in`). This is leak detection,
not anonymization: whoever knows an id can test it against the hashes.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)


def stratified_split(
    labels: list[int],
    fraction: float,
    seed: int,
    *,
    groups: Sequence[str | None] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices (train, val): about ``fraction`` of each class goes to validation, at least one where
    the class has two or more samples. The same labels and seed always give the same split.

    ``groups`` (one per label, None for a scan without one): when any is named, `grouped_split`
    (``class_names`` name the classes in its error)."""
    if groups is not None and any(g is not None for g in groups):
        return grouped_split(labels, groups, fraction, seed, class_names=class_names)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        n_val = _val_count(len(members), fraction)
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def _val_count(n: int, fraction: float) -> int:
    """How many of ``n`` go to validation: round(n × fraction), and 1 to n - 1 when n ≥ 2."""
    n_val = round(n * fraction) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return n_val


def grouped_split(
    labels: list[int],
    groups: Sequence[str | None],
    fraction: float,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices (train, val) with every group wholly on one side, about ``fraction`` of the groups
    in validation, stratified as far as whole groups allow; the same input and seed always give the
    same split.

    Method: each group is filed under its majority class (most scans; the lowest class on a tie),
    and within each class its groups are shuffled (seeded) and split as `stratified_split` splits
    scans: round(fraction × groups) to validation, and at least one group to each side where there
    are two or more. A class can still miss a side when its scans sit in groups of another majority
    class; then the smallest group holding it moves across, where the move takes no class away
    from the side it leaves (training is served first and always: a class without training scans
    would be untrainable; a class left without validation scans is a logged warning). Groups that
    are all single scans give exactly the split of `stratified_split`. A class held by fewer than
    two groups cannot be on both sides: with ``fraction`` > 0 that is a VolumetricError naming it.
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")

    def name(c: int) -> str:
        return repr(class_names[c]) if class_names is not None else str(c)

    # groups in order of first appearance; a scan without a group is a group of its own
    keys = [("group", g) if g is not None else ("scan", i) for i, g in enumerate(groups)]
    members: dict[tuple[str, str | int], list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    order = list(members)  # (G,) group keys
    counts = [Counter(labels[i] for i in members[key]) for key in order]  # scans per class
    classes = sorted(set(labels))
    if fraction > 0:
        for c in classes:
            holding = sum(1 for count in counts if count[c])
            if holding < 2:
                raise VolumetricError(
                    f"class {name(c)} has scans in only {holding} group; a validation split that "
                    "keeps groups whole needs at least 2 groups per class (add groups, or give --val)"
                )
    rng = random.Random(seed)
    in_val = [False] * len(order)
    majority = [
        # the cast: mypy cannot infer a lambda with a default argument (kept for B023)
        min(count, key=cast("Callable[[int], tuple[int, int]]", lambda c, n=count: (-n[c], c)))
        for count in counts
    ]
    for c in classes:  # per majority class, as stratified_split per class
        held = [g for g in range(len(order)) if majority[g] == c]
        rng.shuffle(held)
        for g in held[: _val_count(len(held), fraction)]:
            in_val[g] = True
    if fraction > 0:
        missing = _cover_both_sides(in_val, counts, classes)
        if missing:
            log.warning(
                "no validation scans of class(es) %s: their groups could not be split between "
                "training and validation",
                ", ".join(map(name, missing)),
            )
    train = sorted(i for g, key in enumerate(order) if not in_val[g] for i in members[key])
    val = sorted(i for g, key in enumerate(order) if in_val[g] for i in members[key])
    return train, val


def _cover_both_sides(in_val: list[bool], counts: list[Counter], classes: list[int]) -> list[int]:
    """Move whole groups (``in_val``, in place) so that every class has scans on both sides where
    the groups allow (see `grouped_split`); the classes still without validation scans."""
    # scans per class in training, in validation
    side: dict[bool, Counter[int]] = {False: Counter(), True: Counter()}
    for g, count in enumerate(counts):
        side[in_val[g]].update(count)
    for to_val in (False, True):  # training first
        source = side[not to_val]
        for c in classes:
            if side[to_val][c]:
                continue
            candidates = sorted(
                (g for g, count in enumerate(counts) if in_val[g] != to_val and count[c]),
                key=lambda g: (sum(counts[g].values()), g),
            )
            safe = [g for g in candidates if all(source[k] > n for k, n in counts[g].items())]
            chosen = safe[:1] or (candidates[:1] if not to_val else [])
            for g in chosen:
                in_val[g] = to_val
                source.subtract(counts[g])
                side[to_val].update(counts[g])
    return [c for c in classes if not side[True][c]]


def hash_groups(groups: Sequence[str]) -> dict[str, Any]:
    """``{"salt": random hex, "hashes": sorted SHA-256 hex of salt + group}`` of the distinct
    groups: what a checkpoint records of its training split (leak detection, not anonymization)."""
    salt = secrets.token_hex(16)  # from the OS: no seeded RNG is drawn from
    return {"salt": salt, "hashes": sorted({_digest(salt, g) for g in groups})}


def hashed_in(record: dict[str, Any] | None, groups: Sequence[str | None]) -> list[bool]:
    """For each of ``groups``, whether it is among the hashed groups of ``record`` (`hash_groups`;
    None or a malformed record: none is)."""
    if not isinstance(record, dict) or not isinstance(record.get("salt"), str):
        return [False] * len(groups)
    salt, hashes = record["salt"], set(record.get("hashes") or ())
    return [g is not None and _digest(salt, g) in hashes for g in groups]


def _digest(salt: str, group: str) -> str:
    return hashlib.sha256((salt + group).encode("utf-8")).hexdigest()

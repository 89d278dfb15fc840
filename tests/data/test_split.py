"""The train/validation split: stratified by class, and with groups (patients) kept whole; the
salted hashes of training groups that checkpoints record."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter

import pytest

from volumetric.config import Config
from volumetric.data.source import Entry, ScanSource
from volumetric.data.split import grouped_split, hash_groups, hashed_in, stratified_split
from volumetric.engine.setup import split_data, training_group_hashes
from volumetric.errors import VolumetricError

LABELS = [0] * 10 + [1] * 7 + [2] * 3


# ------------------------------------------------------------------------------------ without groups


def test_split_is_seeded():
    assert stratified_split(LABELS, 0.3, seed=1) == stratified_split(LABELS, 0.3, seed=1)
    splits = {tuple(stratified_split(LABELS, 0.3, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 3])
def test_split_disjoint_covering_stratified(fraction, seed):
    train, val = stratified_split(LABELS, fraction, seed)
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(len(LABELS)))
    assert train == sorted(train) and val == sorted(val)
    counts, val_counts = Counter(LABELS), Counter(LABELS[i] for i in val)
    for label, total in counts.items():
        assert 1 <= val_counts[label] <= total - 1  # every class in both parts
        assert abs(val_counts[label] - total * fraction) <= 1


def test_split_zero_fraction_and_singletons():
    train, val = stratified_split([0, 0, 1], 0.0, seed=0)
    assert val == [] and train == [0, 1, 2]
    train, val = stratified_split([0, 0, 0, 0, 1], 0.2, seed=0)
    assert 4 in train  # a class with one sample stays in training at the default fraction
    assert len([i for i in val if i < 4]) == 1  # at least one of a class with two or more


def test_split_without_groups_is_unchanged():
    """Pinned: the indices this seed gave before groups existed; no group named is the same."""
    expected = stratified_split(LABELS, 0.3, seed=1)
    assert expected == ([0, 1, 2, 3, 4, 5, 7, 10, 11, 13, 14, 16, 17, 18], [6, 8, 9, 12, 15, 19])
    assert stratified_split(LABELS, 0.3, seed=1, groups=[None] * len(LABELS)) == expected


@pytest.mark.parametrize("fraction", [0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 3])
def test_single_scan_groups_give_the_plain_split(fraction, seed):
    groups = [f"p{i}" for i in range(len(LABELS))]
    assert grouped_split(LABELS, groups, fraction, seed) == stratified_split(LABELS, fraction, seed)


# --------------------------------------------------------------------------------------- with groups


def patients(seed: int, n: int = 60, classes: int = 3) -> tuple[list[int], list[str]]:
    """1 to 5 scans per patient, mostly of the patient's own class, in a shuffled order."""
    rng = random.Random(seed)
    labels, groups = [], []
    for p in range(n):
        for _ in range(rng.randint(1, 5)):
            own = rng.random() < 0.85
            labels.append(p % classes if own else rng.randrange(classes))
            groups.append(f"patient-{p}")
    order = list(range(len(labels)))
    rng.shuffle(order)
    return [labels[i] for i in order], [groups[i] for i in order]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_groups_whole(fraction, seed):
    labels, groups = patients(seed)
    train, val = stratified_split(labels, fraction, seed, groups=groups)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    train_groups, val_groups = {groups[i] for i in train}, {groups[i] for i in val}
    assert not train_groups & val_groups  # no patient on both sides
    total = len(set(groups))
    # a fraction of the groups, rounded per majority class (3 here)
    assert abs(len(val_groups) - fraction * total) <= 3
    for c in range(3):  # stratified: every class on both sides, its scans roughly in proportion
        in_val = sum(labels[i] == c for i in val)
        assert in_val >= 1 and sum(labels[i] == c for i in train) >= 1
        assert abs(in_val / labels.count(c) - fraction) < 0.15


def test_grouped_split_is_deterministic_and_seeded():
    labels, groups = patients(5)
    first = stratified_split(labels, 0.2, 7, groups=groups)
    assert first == stratified_split(labels, 0.2, 7, groups=groups)
    assert len({tuple(stratified_split(labels, 0.2, s, groups=groups)[1]) for s in range(5)}) > 1


def test_scans_without_a_group_are_groups_of_their_own():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", None, None]
    for seed in range(10):
        train, val = stratified_split(labels, 0.4, seed, groups=groups)
        for pair in ((0, 1), (2, 3), (4, 5), (6, 7)):
            assert (pair[0] in val) == (pair[1] in val)
        assert {labels[i] for i in val} == {0, 1} == {labels[i] for i in train}


def test_a_class_only_in_mixed_groups_reaches_both_sides():
    """Class 2 is never a group's majority: a group holding it is moved across."""
    labels = [0, 0, 2] * 3 + [1, 1, 2] * 3  # groups g0..g5 of three scans
    groups = [f"g{i // 3}" for i in range(len(labels))]
    for seed in range(10):
        train, val = stratified_split(labels, 0.3, seed, groups=groups)
        assert {labels[i] for i in val} == {0, 1, 2} == {labels[i] for i in train}
        assert not {groups[i] for i in train} & {groups[i] for i in val}


def test_a_class_in_one_group_is_an_error():
    labels, groups = [0, 0, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(VolumetricError, match=r"class 'lesion' has scans in only 1 group") as error:
        stratified_split(labels, 0.2, 0, groups=groups, class_names=["healthy", "lesion"])
    assert "\n" not in str(error.value)
    # nothing to validate: no split, no error
    assert stratified_split(labels, 0.0, 0, groups=groups) == (list(range(6)), [])


def test_too_few_groups_to_cover_validation_is_a_warning(caplog):
    """Three classes, three groups of two classes each: no split puts every class on both
    sides; training gets them all, validation what is left, with a warning."""
    labels, groups = [0, 1, 0, 2, 1, 2], ["a", "a", "b", "b", "c", "c"]
    with caplog.at_level(logging.WARNING):
        train, val = stratified_split(labels, 0.3, 0, groups=groups)
    assert {labels[i] for i in train} == {0, 1, 2} and val
    assert "no validation scans of class(es)" in caplog.text


# ------------------------------------------------------------------------------------- split_data


def entries(labels: list[int], groups: list[str | None]) -> list[Entry]:
    names = ["healthy", "lesion"]
    return [
        Entry(ScanSource.of(f"scan{i}.nii"), names[y], g)
        for i, (y, g) in enumerate(zip(labels, groups))
    ]


def test_split_data_rows_and_hashes(caplog):
    labels = [0, 1] * 10
    items = entries(labels, [f"p{i // 4}" for i in range(20)])  # 5 patients of 4 scans
    config = Config()
    names, train_pairs, val_pairs, split = split_data(config, items, None)
    assert names == ["healthy", "lesion"]
    roles = Counter(role for _, role in split)
    assert roles == {"train": len(train_pairs), "validation": len(val_pairs)} and val_pairs
    train_groups = {e.group for e, role in split if role == "train"}
    assert not train_groups & {e.group for e, role in split if role == "validation"}
    record = training_group_hashes(split)
    assert len(record["hashes"]) == len(train_groups)
    assert hashed_in(record, [e.group for e in items]) == [e.group in train_groups for e in items]
    # --val: the split is what was given; a patient on both sides is a warning
    with caplog.at_level(logging.WARNING):
        _, _, _, given = split_data(config, items[:12], items[12:])
    assert [r for _, r in given] == ["train"] * 12 + ["validation"] * 8
    assert caplog.text.count("group(s) have scans in both") == 0
    with caplog.at_level(logging.WARNING):
        split_data(config, items[:14], items[14:])  # p3: scans 12 to 15
    assert "1 group(s) have scans in both the training and the validation data (e.g. p3)" in (
        caplog.text
    )
    # without groups: no hashes
    assert training_group_hashes(split_data(config, entries(labels, [None] * 20), None)[3]) is None


def test_split_data_error_names_the_class():
    items = entries([0, 0, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"])
    with pytest.raises(VolumetricError, match="class 'lesion' has scans in only 1 group"):
        split_data(Config(), items, None)


# ------------------------------------------------------------------------------------------- hashes


def test_group_hashes_are_salted_and_hold_no_ids():
    first, second = hash_groups(["patient-7", "patient-7", "patient-9"]), hash_groups(["patient-7"])
    assert len(first["hashes"]) == 2 and first["hashes"] == sorted(first["hashes"])
    assert first["salt"] != second["salt"]  # a new salt per record
    assert "patient-7" not in repr(first)
    assert hashlib.sha256(b"patient-7").hexdigest() not in first["hashes"]  # not unsalted
    expected = hashlib.sha256((first["salt"] + "patient-7").encode()).hexdigest()
    assert expected in first["hashes"]
    assert hashed_in(first, ["patient-9", "patient-8", None]) == [True, False, False]
    assert hashed_in(None, ["patient-9"]) == [False]
    assert hashed_in({"hashes": []}, ["patient-9"]) == [False]  # malformed: nothing matches

"""Imbalanced classes: class-weighted loss (train.class_weights), class-balanced epochs
(train.sampler) and the key that picks best.pt (train.select), validated and kept across a resume."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIG,
    blob_volume,
    train,
    train_stopped_in_epoch_2,
    write_config,
    write_scan,
)

import volumetric.engine.setup as engine_setup
from volumetric.checkpoint import load_checkpoint
from volumetric.config import Config, config_from_dict
from volumetric.data.sampler import BalancedEpochSampler
from volumetric.engine.objective import Classification, selection_score
from volumetric.engine.setup import balanced_class_weights, build_criterion
from volumetric.engine.train import RunState, _rescore_best
from volumetric.errors import ConfigError

NINE_TO_ONE = [0] * 90 + [1] * 10


def config_with(**train: str) -> Config:
    config = Config()
    for key, value in train.items():
        setattr(config.train, key, value)
    return config.validate()


# ------------------------------------------------------------------------------------ loss weights


def test_balanced_weights_of_a_nine_to_one_split_follow_the_formula():
    weights = balanced_class_weights(NINE_TO_ONE, 2)
    expected = torch.tensor([100 / (2 * 90), 100 / (2 * 10)])  # n / (classes * n_class)
    assert torch.allclose(weights, expected)
    # each class then carries the same total weight: half of the loss each
    assert torch.allclose(weights * torch.tensor([90.0, 10.0]), torch.tensor([50.0, 50.0]))
    criterion = build_criterion(config_with(class_weights="balanced"), NINE_TO_ONE, ["a", "b"])
    assert isinstance(criterion, torch.nn.CrossEntropyLoss)
    assert torch.allclose(criterion.weight, expected)
    assert criterion.label_smoothing == Config().train.label_smoothing


def test_default_loss_is_unweighted():
    criterion = build_criterion(Config(), NINE_TO_ONE, ["a", "b"])
    assert criterion.weight is None and criterion.label_smoothing == 0.1


def test_a_class_without_training_items_gets_no_weight():
    assert balanced_class_weights([0, 0, 2], 3).tolist() == pytest.approx([0.5, 0.0, 1.0])


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("class_weights", "inverse", "('none', 'balanced')"),
        ("sampler", "weighted", "('shuffle', 'balanced')"),
        ("select", "accuracy", "('balanced_accuracy', 'auroc', 'loss')"),
    ],
)
def test_unknown_values_are_refused_with_the_key_and_the_choices(key, value, allowed):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"train": {key: value}})
    assert f"train.{key}={value!r}" in str(error.value) and allowed in str(error.value)


def test_defaults_change_nothing():
    t = Config().train
    assert (t.class_weights, t.sampler, t.select) == ("none", "shuffle", "balanced_accuracy")


# ----------------------------------------------------------------------------------- selection key

# val metrics of four epochs: balanced accuracy ties at epochs 2 and 3 (lower loss: 3), AUROC is
# undefined at epoch 4 (counts as -inf), the loss is lowest at epoch 4
HISTORY = [
    {"epoch": 1, "val_loss": 0.52, "val_balanced_accuracy": 0.60, "val_auroc": 0.95},
    {"epoch": 2, "val_loss": 0.60, "val_balanced_accuracy": 0.80, "val_auroc": 0.70},
    {"epoch": 3, "val_loss": 0.55, "val_balanced_accuracy": 0.80, "val_auroc": 0.85},
    {"epoch": 4, "val_loss": 0.40, "val_balanced_accuracy": 0.50, "val_auroc": math.nan},
]


def best_epoch(history: list[dict[str, float]], select: str) -> int:
    """As the training loop decides: an epoch is best when its score is strictly greater."""
    best_score, best = [-math.inf, -math.inf], 0
    for row in history:
        score = selection_score(row, select)
        if score > best_score:
            best_score, best = score, int(row["epoch"])
    return best


@pytest.mark.parametrize("select, expected", [("balanced_accuracy", 3), ("auroc", 1), ("loss", 4)])
def test_the_selection_key_picks_its_epoch(select, expected):
    assert best_epoch(HISTORY, select) == expected


def test_without_validation_the_latest_epoch_is_best():
    history = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    assert all(best_epoch(history, key) == 3 for key in ("balanced_accuracy", "auroc", "loss"))


def test_resume_rescores_best_pt_by_the_key_of_the_resumed_run(caplog):
    """last.pt holds best_score by balanced accuracy (epoch 3); resumed with select: auroc, the
    best-so-far value becomes epoch 3's AUROC, so a later epoch replaces best.pt only if it beats
    best.pt's AUROC."""
    state = RunState(epoch=4, history=HISTORY, best_score=[0.80, -0.55], best_epoch=3)
    run = SimpleNamespace(objective=Classification(select="auroc"))
    with caplog.at_level(logging.WARNING):
        _rescore_best(run, state, "balanced_accuracy")
    assert state.best_score == [0.85, -0.55] and state.best_epoch == 3
    assert "balanced_accuracy" in caplog.text and "auroc" in caplog.text
    better = {"epoch": 5, "val_loss": 0.9, "val_balanced_accuracy": 0.5, "val_auroc": 0.86}
    worse = {**better, "val_auroc": 0.84}
    assert selection_score(better, "auroc") > state.best_score > selection_score(worse, "auroc")


def test_resume_with_the_same_key_keeps_the_stored_score(caplog):
    state = RunState(epoch=4, history=HISTORY, best_score=[-0.40, 0.50], best_epoch=4)
    with caplog.at_level(logging.WARNING):
        _rescore_best(SimpleNamespace(objective=Classification(select="loss")), state, "loss")
    assert state.best_score == [-0.40, 0.50] and not caplog.text


# ----------------------------------------------------------------------------------- end to end


def imbalanced_data(root: Path) -> tuple[Path, Path]:
    """train: 18 healthy, 2 lesion (9:1); val: 3 of each."""
    rng = np.random.default_rng(1)
    counts = {"train": {"healthy": 18, "lesion": 2}, "val": {"healthy": 3, "lesion": 3}}
    for split, per_class in counts.items():
        for label, n in per_class.items():
            for i in range(n):
                volume = blob_volume(rng, (20, 18, 16), label == "lesion")
                write_scan(root / split / label / f"scan{i:02d}.nii.gz", volume)
    return root / "train", root / "val"


@pytest.mark.slow  # two tiny runs: 3 epochs, and 1 + 2 epochs with a resume
def test_imbalance_options_train_resume_exactly_and_pick_the_lowest_loss(tmp_path, monkeypatch):
    """class_weights and sampler balanced, select: loss, on a 9:1 training set: the loss gets the
    formula's weights, epochs come from the balanced sampler, a run interrupted after epoch 1 and
    resumed ends with the weights of one never stopped, and best.pt is the epoch of the lowest
    val_loss, in last.pt's best_score by that key."""
    train_dir, val_dir = imbalanced_data(tmp_path / "data")
    options = dict(class_weights="balanced", sampler="balanced", select="loss", epochs=3)
    config = write_config(
        tmp_path / "tiny.yaml", {**TINY_CONFIG, "train": {**TINY_CONFIG["train"], **options}}
    )
    criteria, samplers = [], []

    def spy_criterion(*args, **kwargs):
        criteria.append(build_criterion(*args, **kwargs))
        return criteria[-1]

    def spy_sampler(*args, **kwargs):
        samplers.append(BalancedEpochSampler(*args, **kwargs))
        return samplers[-1]

    monkeypatch.setattr(engine_setup, "build_criterion", spy_criterion)
    monkeypatch.setattr(engine_setup, "BalancedEpochSampler", spy_sampler)
    val = ("--val", str(val_dir))
    assert train(train_dir, tmp_path / "reference", config, *val) == 0
    expected = torch.tensor([20 / (2 * 18), 20 / (2 * 2)])  # healthy, lesion
    assert len(criteria) == 1 and torch.allclose(criteria[0].weight, expected)
    assert len(samplers) == 1 and samplers[0].n == 20

    run = tmp_path / "run"
    assert train_stopped_in_epoch_2(monkeypatch, train_dir, run, config, *val) == 130
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert train(train_dir, run, None, *val, "--resume") == 0
    for folder in (tmp_path / "reference", run):
        last, best = load_checkpoint(folder / "last.pt"), load_checkpoint(folder / "best.pt")
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        lowest = min(rows, key=lambda r: float(r["val_loss"]))
        assert best.epoch == int(lowest["epoch"]) == last.training["best_epoch"]
        assert best.metrics["val_loss"] == pytest.approx(float(lowest["val_loss"]))
        assert last.training["select"] == "loss"
        assert last.training["best_score"][0] == pytest.approx(-float(lowest["val_loss"]))
    reference = load_checkpoint(tmp_path / "reference" / "last.pt").weights
    resumed = load_checkpoint(run / "last.pt").weights
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)

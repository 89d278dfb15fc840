"""Patients, not scans: a grouped training run's split.csv and hashed training groups, the
warning of volumetric-evaluate when test scans belong to training groups, and the cluster
bootstrap of the AUROC interval."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIG,
    assert_matches_stored,
    make_tiny_dataset,
    read_csv,
    train,
    write_config,
)

from volumetric.data.loading import LoadingOptions
from volumetric.evaluation.evaluate import evaluate_checkpoint
from volumetric.evaluation.metrics import bootstrap_auroc, evaluation_report

# ------------------------------------------------------------------------------- cluster bootstrap

# 30 scans, one score each (classes alternate): the pinned interval is what the scan bootstrap gave
# before groups existed
SCORES = [0.06, 0.466, 0.561, 0.708, 0.066, 0.603, 0.335, 0.412, 0.514, 0.38, 0.274, 0.662, 0.301]
SCORES += [0.711, 0.516, 0.969, 0.199, 0.754, 0.487, 0.505, 0.001, 0.981, 0.209, 0.52, 0.624]
SCORES += [0.71, 0.33, 0.841, 0.021, 0.795]
PINNED = (0.7897321428571429, 0.9800694444444444)  # 100 resamples, seed 5


def scores_as_probs(scores) -> np.ndarray:
    p = np.asarray(scores, dtype=np.float64)
    return np.stack([1 - p, p], axis=1)  # (N, 2)


def test_scan_bootstrap_without_groups_is_unchanged():
    probs, labels = scores_as_probs(SCORES), np.array([0, 1] * 15)
    plain = bootstrap_auroc(probs, labels, resamples=100, seed=5)
    assert_matches_stored((plain["low"], plain["high"]), PINNED, "float64 statistics", "interval")
    assert plain["unit"] == "scan" and "groups" not in plain
    assert bootstrap_auroc(probs, labels, resamples=100, seed=5, groups=[None] * 30) == plain
    report = evaluation_report(probs, labels, ["a", "b"], bootstrap_resamples=100, seed=5)
    assert_matches_stored(report["auroc_ci95"], PINNED, "float64 statistics", "report's interval")
    assert report["auroc_bootstrap"]["unit"] == "scan"


def test_cluster_bootstrap_draws_groups():
    """10 patients of 20 identical scans each: 200 scans carry the evidence of 10, and only the
    group bootstrap says so."""
    patient_scores = [0.1, 0.3, 0.5, 0.6, 0.8, 0.2, 0.4, 0.55, 0.7, 0.9]  # classes 0 (5), 1 (5)
    patient_labels = [0] * 5 + [1] * 5
    probs = scores_as_probs(np.repeat(patient_scores, 20))  # (200, 2)
    labels = np.repeat(patient_labels, 20)  # (200,)
    groups = [f"patient-{p}" for p in range(10) for _ in range(20)]
    scans = bootstrap_auroc(probs, labels, resamples=100, seed=0)
    patients = bootstrap_auroc(probs, labels, resamples=100, seed=0, groups=groups)
    assert patients["unit"] == "group" and patients["groups"] == 10
    assert patients["high"] - patients["low"] > 2 * (scans["high"] - scans["low"])
    # resamples missing a class are skipped: 10 groups draw one class only in 2 × 0.5^10 of them
    assert 95 <= patients["used"] <= 100
    # the same seed, the same interval
    report = evaluation_report(probs, labels, ["a", "b"], bootstrap_resamples=100, groups=groups)
    assert report["auroc_ci95"] == [patients["low"], patients["high"]]
    assert report["auroc_bootstrap"] == {
        "resamples": 100,
        "used": patients["used"],
        "seed": 0,
        "level": 0.95,
        "unit": "group",
        "groups": 10,
    }
    with pytest.raises(ValueError, match="groups"):
        evaluation_report(probs, labels, ["a", "b"], groups=groups[:-1])


# ---------------------------------------------------------------------------- a grouped training run


def write_manifest(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple]]:
    """A 1-epoch tiny run on a manifest of 10 patients, 2 scans each (5 per class): the run
    folder and the manifest's rows."""
    root = tmp_path_factory.mktemp("grouped")
    data = make_tiny_dataset(root / "data")
    rows = [
        (scan, scan.parent.name, f"{scan.parent.name}-{int(scan.name[4:6]) // 2}")
        for scan in sorted(data.rglob("scan*"))
    ]
    manifest = write_manifest(root / "manifest.csv", rows)
    config = write_config(root / "tiny.yaml", {**TINY_CONFIG, "train": {**TINY_CONFIG["train"]}})
    run = root / "run"
    assert train(manifest, run, config, "--train.epochs=1", "--train.num_workers=0") == 0
    return run, rows


def test_split_csv_of_a_grouped_run(grouped_run):
    run, rows = grouped_run
    header, split = read_csv(run / "split.csv")
    assert header == ["path", "series_uid", "label", "group", "role"]
    assert sorted((Path(r["path"]), r["label"], r["group"]) for r in split) == sorted(rows)
    assert all(r["series_uid"] == "" for r in split)
    roles = {
        role: {r["group"] for r in split if r["role"] == role} for role in ("train", "validation")
    }
    assert {r["role"] for r in split} == {"train", "validation"}
    assert not roles["train"] & roles["validation"]  # no patient on both sides
    assert len(roles["validation"]) == 2  # 0.2 of 5 patients per class: one each
    assert {r["label"] for r in split if r["role"] == "validation"} == {"healthy", "lesion"}
    # best.pt and last.pt record the training patients, hashed with a salt, not the ids
    for name in ("best.pt", "last.pt"):
        record = torch.load(run / name, map_location="cpu", weights_only=True)["training_groups"]
        assert sorted(record) == ["hashes", "salt"] and len(record["hashes"]) == 8
        salted = {hashlib.sha256((record["salt"] + g).encode()).hexdigest() for g in roles["train"]}
        assert set(record["hashes"]) == salted
        assert not any(g in json.dumps(record) for g in roles["train"] | roles["validation"])


def evaluate(run: Path, rows, tmp_path: Path, caplog) -> tuple[dict, list[str]]:
    """evaluate_checkpoint of best.pt on a manifest of ``rows``: (metrics, leak warnings)."""
    manifest = write_manifest(tmp_path / "test.csv", rows)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="volumetric"):
        metrics = evaluate_checkpoint(
            run / "best.pt",
            manifest,
            tmp_path / "eval",
            device="cpu",
            loading=LoadingOptions(num_workers=0, progress=False),
            bootstrap_resamples=50,
        )
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "training split" in r.getMessage()
    ]
    return metrics, warnings


def test_evaluate_warns_of_test_scans_from_training_groups(grouped_run, tmp_path, caplog):
    run, _ = grouped_run
    _, split = read_csv(run / "split.csv")
    train_rows = [r for r in split if r["role"] == "train"]
    val_rows = [r for r in split if r["role"] == "validation"]
    as_rows = [(r["path"], r["label"], r["group"]) for r in val_rows]

    # the validation patients were never trained on: no warning
    metrics, warnings = evaluate(run, as_rows, tmp_path / "held_out", caplog)
    assert warnings == []
    assert metrics["auroc_bootstrap"]["unit"] == "group"
    assert metrics["auroc_bootstrap"]["groups"] == 2
    header, predictions = read_csv(tmp_path / "held_out" / "eval" / "predictions.csv")
    assert header[header.index("label") + 1] == "group"
    assert sorted(r["group"] for r in predictions) == sorted(r["group"] for r in val_rows)

    # two scans of one training patient among them: one warning line naming them
    leaked = [r for r in train_rows if r["group"] == train_rows[0]["group"]]
    assert len(leaked) == 2
    rows = as_rows + [(r["path"], r["label"], r["group"]) for r in leaked]
    _, warnings = evaluate(run, rows, tmp_path / "leaked", caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("2 of 6 test scans (1 group(s)) belong to groups")
    assert all(r["path"] in warnings[0] for r in leaked)
    assert train_rows[0]["group"] not in warnings[0]  # the id itself is not needed to tell

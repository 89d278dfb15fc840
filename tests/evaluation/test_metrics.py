"""Evaluation metrics (metrics.json's content): known values on hand-made probabilities, edge cases
(one class only, a class absent), and the seeded bootstrap interval of the AUROC."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import THREE_LABELS, THREE_PROBS, assert_png

from volumetric.evaluation.metrics import (
    bootstrap_auroc,
    classification_metrics,
    evaluation_report,
    roc_curves,
)
from volumetric.evaluation.plots import plot_roc

# Binary, 6 healthy and 4 lesion scans; prob_lesion > 0.5 predicts lesion.
#   predictions: healthy 4 right, 2 wrong; lesion 3 right, 1 wrong → confusion [[4, 2], [1, 3]]
#   lesion: precision 3/5, recall 3/4, F1 2/3; healthy: precision 4/5, recall 4/6, F1 8/11
#   AUROC: of the 6×4 (healthy, lesion) pairs, 20 rank the lesion scan higher → 5/6
BINARY_LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
BINARY_LESION = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.55, 0.8, 0.9, 0.45]


def binary_probs() -> torch.Tensor:
    lesion = torch.tensor(BINARY_LESION, dtype=torch.float64)
    return torch.stack([1 - lesion, lesion], dim=1)  # (10, 2)


# ---------------------------------------------------------------------------------------------- metrics


def test_report_binary_known_values():
    report = evaluation_report(
        binary_probs(),
        torch.tensor(BINARY_LABELS),
        ["healthy", "lesion"],
        loss=0.25,
        bootstrap_resamples=200,
    )
    assert report["num_scans"] == 10 and report["loss"] == 0.25
    assert report["accuracy"] == pytest.approx(0.7)
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert report["auroc"] == pytest.approx(5 / 6)
    assert report["auroc_note"] is None
    lesion, healthy = report["per_class"]["lesion"], report["per_class"]["healthy"]
    fields = ("precision", "recall", "f1", "support")
    assert [lesion[k] for k in fields] == pytest.approx([3 / 5, 3 / 4, 2 / 3, 4])
    assert [healthy[k] for k in fields] == pytest.approx([4 / 5, 4 / 6, 8 / 11, 6])
    assert [lesion["auroc"], healthy["auroc"]] == pytest.approx([5 / 6, 5 / 6])
    assert report["class_names"] == report["confusion_matrix"]["labels"] == ["healthy", "lesion"]
    assert report["confusion_matrix"]["matrix"] == [[4, 2], [1, 3]]
    assert report["confusion_matrix"]["rows"] == "true class"
    low, high = report["auroc_ci95"]
    assert low <= 5 / 6 <= high and 0.0 <= low < high <= 1.0
    assert (
        report["auroc_bootstrap"]["resamples"] == 200
        and 0 < report["auroc_bootstrap"]["used"] <= 200
    )
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN anywhere
    # the cheap training-time metrics agree with the report
    cheap = classification_metrics(binary_probs().float(), torch.tensor(BINARY_LABELS))
    assert cheap == pytest.approx(
        {k: report[k] for k in ("accuracy", "balanced_accuracy", "auroc")}
    )


def test_report_three_classes_macro_one_vs_rest():
    probs, labels = torch.tensor(THREE_PROBS), torch.tensor(THREE_LABELS)
    report = evaluation_report(probs, labels, ["a", "b", "c"], bootstrap_resamples=100)
    assert [report["per_class"][c]["auroc"] for c in "abc"] == pytest.approx([1.0, 7 / 8, 15 / 16])
    assert report["auroc"] == pytest.approx(15 / 16)
    assert report["confusion_matrix"]["matrix"] == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert report["accuracy"] == pytest.approx(5 / 6)
    assert (
        report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
        and report["per_class"]["c"]["recall"] == 0.5
    )
    assert classification_metrics(probs, labels)["auroc"] == pytest.approx(15 / 16)
    curves = roc_curves(probs, labels)
    assert sorted(curves) == [0, 1, 2] and [a for _, _, a in curves.values()] == pytest.approx(
        [1.0, 7 / 8, 15 / 16]
    )
    # a class absent from the data: no AUROC for it, the macro averages the classes present
    present = labels < 2
    partial = evaluation_report(
        probs[present], labels[present], ["a", "b", "c"], bootstrap_resamples=50
    )
    assert (
        partial["per_class"]["c"]["auroc"] is None and partial["per_class"]["c"]["recall"] is None
    )
    assert partial["per_class"]["c"]["support"] == 0
    assert partial["auroc"] == pytest.approx(
        np.mean([partial["per_class"][c]["auroc"] for c in "ab"])
    )


def test_report_single_class_is_null_with_a_reason(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    labels = torch.zeros(3, dtype=torch.long)
    report = evaluation_report(probs, labels, ["healthy", "lesion"])
    assert report["auroc"] is None and report["auroc_ci95"] is None
    assert report["auroc_bootstrap"]["used"] == 0
    assert "only one class (healthy)" in report["auroc_note"]
    assert report["accuracy"] == pytest.approx(2 / 3) and report[
        "balanced_accuracy"
    ] == pytest.approx(2 / 3)
    assert report["per_class"]["lesion"]["recall"] is None  # no lesion scan: recall undefined
    assert report["per_class"]["lesion"]["precision"] == 0.0  # predicted once, wrongly
    assert report["confusion_matrix"]["matrix"] == [[2, 1], [0, 0]]
    assert "NaN" not in json.dumps(report)
    assert math.isnan(
        classification_metrics(probs, labels)["auroc"]
    )  # training validation: NaN, no crash
    assert roc_curves(probs, labels) == {}
    plot_roc(
        {}, ["healthy", "lesion"], tmp_path / "roc.png", macro_auroc=None, note=report["auroc_note"]
    )
    assert_png(tmp_path / "roc.png")


def test_bootstrap_is_seeded_and_skips_one_class_resamples():
    probs, labels = binary_probs().numpy(), np.array(BINARY_LABELS)
    first = bootstrap_auroc(probs, labels, resamples=200, seed=7)
    assert first == bootstrap_auroc(
        probs, labels, resamples=200, seed=7
    )  # same seed, same interval
    assert first != bootstrap_auroc(probs, labels, resamples=200, seed=8)
    assert first["low"] <= 5 / 6 <= first["high"]
    assert (
        first["resamples"] == 200 and 190 <= first["used"] <= 200
    )  # one class only: 0.6^10 + 0.4^10 ≈ 0.6%
    # three scans, one positive: (2/3)^3 + (1/3)^3 = 1/3 of the resamples hold one class only and are skipped
    tiny = bootstrap_auroc(probs[[0, 1, 7]], labels[[0, 1, 7]], resamples=300, seed=0)
    assert 150 < tiny["used"] < 250
    assert tiny["low"] == tiny["high"] == 1.0  # perfectly separated in every usable resample
    # perfectly separable data: the interval collapses onto the point estimate
    separable_probs = np.array([[0.9, 0.1]] * 5 + [[0.2, 0.8]] * 5)  # (10, 2)
    separable = bootstrap_auroc(separable_probs, np.array([0] * 5 + [1] * 5), resamples=100)
    assert separable["low"] == separable["high"] == 1.0

"""volumetric-evaluate end to end: the report files (metrics.json, predictions.csv,
confusion_matrix.png, roc.png, reliability.png) of the shared tiny trained run (``trained_run``) on its data set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import assert_png

from volumetric.cli import evaluate_main


def test_evaluate_writes_report_files(trained_run, tiny_dataset_shared, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                str(trained_run / "best.pt"),
                str(tiny_dataset_shared),
                "--output-dir",
                str(out),
                "--no-progress",
                "--report-cases",  # report.html by default; its cases: tests/evaluation/test_report.py
                "0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "metrics.json",
        "predictions.csv",
        "reliability.png",
        "report.html",
        "roc.png",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_scans"] == 20 and math.isfinite(metrics["loss"])
    assert metrics["class_names"] == ["healthy", "lesion"]
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.shape == (2, 2) and matrix.sum() == 20 and list(matrix.sum(axis=1)) == [10, 10]
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / 20)
    assert [metrics["per_class"][c]["support"] for c in ("healthy", "lesion")] == [10, 10]
    assert (
        metrics["auroc_bootstrap"]["resamples"] == 1000
        and metrics["auroc_bootstrap"]["used"] == 1000
    )
    low, high = metrics["auroc_ci95"]
    assert low <= metrics["auroc"] <= high
    assert_png(out / "confusion_matrix.png")
    assert_png(out / "roc.png")
    assert_png(out / "reliability.png")
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["brier"] <= 1 and 0 < metrics["pr_auc"] <= 1
    point = metrics["operating_point"]
    assert point["rule"] == "argmax" and point["threshold"] == 0.5
    assert point["positive_class"] == "lesion"  # the second class: nothing configured
    assert "AUROC" in capsys.readouterr().out

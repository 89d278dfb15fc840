"""Evaluation report (metrics.json, confusion_matrix.png, roc.png) and the training run log
(TensorBoard events, learning_curves.png): known values on hand-made probabilities, edge cases,
valid PNG files, and both end to end on a tiny trained run."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import train, write_config

from volumetric.cli import evaluate_main
from volumetric.engine.run_log import RunLog
from volumetric.evaluation.metrics import (
    bootstrap_auroc,
    classification_metrics,
    evaluation_report,
    roc_curves,
)
from volumetric.evaluation.plots import plot_confusion_matrix, plot_learning_curves, plot_roc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Binary, 6 healthy and 4 lesion scans; prob_lesion > 0.5 predicts lesion.
#   predictions: healthy 4 right, 2 wrong; lesion 3 right, 1 wrong → confusion [[4, 2], [1, 3]]
#   lesion: precision 3/5, recall 3/4, F1 2/3; healthy: precision 4/5, recall 4/6, F1 8/11
#   AUROC: of the 6×4 (healthy, lesion) pairs, 20 rank the lesion scan higher → 5/6
BINARY_LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
BINARY_LESION = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.55, 0.8, 0.9, 0.45]

# Three classes, two scans each (rows sum to 1). One-vs-rest AUROC: class a 1 (perfect), class b 7/8
# (0.4 < 0.5 of a c scan), class c 7.5/8 (0.3 ties with a b scan) → macro (1 + 7/8 + 15/16) / 3 = 15/16.
#   predictions a a b b c b → confusion [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
THREE_LABELS = [0, 0, 1, 1, 2, 2]
THREE_PROBS = [
    [0.8, 0.1, 0.1],
    [0.6, 0.3, 0.1],
    [0.1, 0.7, 0.2],
    [0.3, 0.4, 0.3],
    [0.1, 0.2, 0.7],
    [0.2, 0.5, 0.3],
]


def binary_probs() -> torch.Tensor:
    lesion = torch.tensor(BINARY_LESION, dtype=torch.float64)
    return torch.stack([1 - lesion, lesion], dim=1)  # (10, 2)


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    """A complete, decodable PNG with something drawn on it, and no temporary file left beside it."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as image:
        image.load()
        assert image.width >= 300 and image.height >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reading of an event folder (purges applied): {tag: [(step, value), ...]}, values
    rounded to 6 decimals (they are stored as float32)."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


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


# ---------------------------------------------------------------------------------------------- plots


def test_plots_are_valid_pngs(tmp_path):
    plot_confusion_matrix([[4, 2], [1, 3]], ["healthy", "lesion"], tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")
    names = ["a very long class name", "b", "c"]
    plot_confusion_matrix([[2, 0, 0], [0, 2, 0], [0, 1, 1]], names, tmp_path / "cm3.png")
    assert_png(tmp_path / "cm3.png")
    probs, labels = torch.tensor(THREE_PROBS), torch.tensor(THREE_LABELS)
    plot_roc(roc_curves(probs, labels), names, tmp_path / "roc3.png", macro_auroc=15 / 16)
    assert_png(tmp_path / "roc3.png")
    history = [
        {
            "epoch": e,
            "step": 4 * e,
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e,
            "val_accuracy": 0.5 + e / 10,
            "val_balanced_accuracy": 0.5,
            "val_auroc": math.nan if e == 1 else 0.7,
        }
        for e in (1, 2, 3)
    ]
    plot_learning_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    plot_learning_curves(
        [{"epoch": 1, "step": 2, "train_loss": 0.7}], tmp_path / "no_val.png"
    )  # no validation
    assert_png(tmp_path / "no_val.png")


# ---------------------------------------------------------------------------------------------- run log


def test_run_log_appends_and_purges_on_resume(tmp_path):
    """A killed run logged steps 1-10 but last.pt holds step 6: the resumed run's steps 7-8 replace them."""
    history = [
        {
            "epoch": 1,
            "step": 6,
            "lr": 0.1,
            "train_loss": 0.9,
            "val_loss": 0.8,
            "val_auroc": math.nan,
        }
    ]
    with RunLog(tmp_path) as run_log:
        for step in range(1, 11):
            run_log.log_step(step, 1.0)
        run_log.log_epoch(history)
    assert_png(tmp_path / "learning_curves.png")
    time.sleep(1.1)  # event files are named by the second they were opened
    history.append(
        {"epoch": 2, "step": 8, "lr": 0.05, "train_loss": 0.5, "val_loss": 0.6, "val_auroc": 0.75}
    )
    with RunLog(tmp_path, start_step=6) as run_log:
        for step in (7, 8):
            run_log.log_step(step, 2.0)
        run_log.log_epoch(history)
    logged = scalars(tmp_path / "tensorboard")
    assert logged["train/batch_loss"] == [(s, 1.0) for s in range(1, 7)] + [(7, 2.0), (8, 2.0)]
    assert logged["train/loss"] == [(6, 0.9), (8, 0.5)]
    assert logged["train/epoch"] == [(6, 1.0), (8, 2.0)]
    assert logged["val/auroc"] == [(8, 0.75)]  # NaN is not logged
    assert "val/accuracy" not in logged
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_run_log_disabled_writes_nothing(tmp_path):
    with RunLog(tmp_path / "run", enabled=False) as run_log:
        run_log.log_step(1, 0.5)
        run_log.log_epoch([{"epoch": 1, "step": 1, "train_loss": 0.5}])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def report_run(tiny_dataset_shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run of the tiny config (4 optimizer steps per epoch)."""
    root = tmp_path_factory.mktemp("report")
    assert train(tiny_dataset_shared, root / "run", write_config(root / "tiny.yaml")) == 0
    return root / "run"


def test_training_writes_tensorboard_and_learning_curves(report_run):
    assert_png(report_run / "learning_curves.png")
    assert len(list((report_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    logged = scalars(report_run / "tensorboard")
    assert [s for s, _ in logged["train/batch_loss"]] == list(range(1, 9))
    for tag in (
        "train/loss",
        "train/lr",
        "val/loss",
        "val/accuracy",
        "val/balanced_accuracy",
        "val/auroc",
    ):
        assert [s for s, _ in logged[tag]] == [4, 8], tag
    assert [v for _, v in logged["train/epoch"]] == [1.0, 2.0]


def test_resume_appends_to_tensorboard(report_run, tiny_dataset_shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_run, run)
    before = (run / "learning_curves.png").read_bytes()
    time.sleep(1.1)  # the new event file must sort after the first (named by the second)
    assert train(tiny_dataset_shared, run, None, "--resume", "--train.epochs=3") == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = scalars(run / "tensorboard")
    assert [s for s, _ in logged["train/loss"]] == [4, 8, 12]
    assert [s for s, _ in logged["train/batch_loss"]] == list(range(1, 13))
    assert logged["train/loss"][:2] == scalars(report_run / "tensorboard")["train/loss"]
    after = (run / "learning_curves.png").read_bytes()
    assert after != before  # redrawn with the third epoch
    assert_png(run / "learning_curves.png")


def test_evaluate_writes_report_files(report_run, tiny_dataset_shared, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                str(report_run / "best.pt"),
                str(tiny_dataset_shared),
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "metrics.json",
        "predictions.csv",
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
    assert "AUROC" in capsys.readouterr().out

"""Evaluation and training plots (confusion_matrix.png, roc.png, learning_curves.png): valid,
non-blank PNG files, long class names and missing values included."""

from __future__ import annotations

import math

import torch
from conftest import THREE_LABELS, THREE_PROBS, assert_png

from volumetric.evaluation.metrics import roc_curves
from volumetric.evaluation.plots import plot_confusion_matrix, plot_learning_curves, plot_roc


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

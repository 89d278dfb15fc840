"""PNG figures of a run and of an evaluation: confusion matrix, ROC curves, learning curves.

Drawn with matplotlib's object-oriented API on an Agg canvas: no display is needed, and pyplot's
global state (and the user's chosen backend) is never touched. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from volumetric.atomic_files import atomic_path

DPI = 120


def _save(figure: Figure, path: Path) -> None:
    """Render ``figure`` to a PNG at ``path`` (temporary name, then renamed)."""
    FigureCanvasAgg(figure)
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path
) -> None:
    """Counts (C, C), rows = true class, columns = predicted class, in class_names order → PNG."""
    counts = np.asarray(matrix, dtype=np.int64)  # (C, C)
    n = len(class_names)
    side = max(4.0, 1.0 + 0.7 * n)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max(initial=0)), 1))
    figure.colorbar(image, ax=ax, label="scans")
    long_names = max(map(len, class_names)) > 8
    ax.set_xticks(
        range(n),
        labels=class_names,
        rotation=45 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({int(counts.sum())} scans)")
    threshold = counts.max(initial=0) / 2.0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if counts[i, j] > threshold else "black",
            )
    _save(figure, path)


def plot_roc(
    curves: dict[int, tuple[np.ndarray, np.ndarray, float]],
    class_names: Sequence[str],
    path: Path,
    *,
    macro_auroc: float | None = None,
    note: str | None = None,
) -> None:
    """One-vs-rest ROC curves {class index: (fpr (K,), tpr (K,), AUROC)} → PNG with AUC in the legend.

    With no curves (AUROC undefined, e.g. one class only) the figure states ``note`` instead.
    """
    figure = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    binary = len(class_names) == 2
    for c, (fpr, tpr, auc) in curves.items():
        name = (
            f"{class_names[c]} vs {class_names[1 - c]}" if binary else f"{class_names[c]} vs rest"
        )
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
    if not curves:
        ax.text(
            0.5,
            0.5,
            note or "ROC undefined",
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    title = "ROC" if binary else "ROC, one vs rest"
    if macro_auroc is not None and math.isfinite(macro_auroc):
        title += f" (AUROC {macro_auroc:.3f})" if binary else f" (macro AUROC {macro_auroc:.3f})"
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    _save(figure, path)


def plot_reliability(bins: Sequence[dict], ece: float | None, path: Path) -> None:
    """The reliability diagram of `volumetric.evaluation.calibration.reliability`'s ``bins``:
    per bin of confidence, the share predicted right against the mean confidence (a calibrated
    model lies on the diagonal), bars for how many scans each bin holds → PNG."""
    figure = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    filled = [b for b in bins if b["scans"]]
    ax.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        marker="o",
        linewidth=1.8,
        label="model",
    )
    total = sum(b["scans"] for b in bins) or 1
    counts = ax.twinx()
    counts.bar(
        [(b["low"] + b["high"]) / 2 for b in bins],
        [b["scans"] / total for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        alpha=0.2,
        color="grey",
    )
    counts.set_ylim(0, 1)
    counts.set_ylabel("share of scans (bars)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    shown = f" (ECE {ece:.3f})" if ece is not None and math.isfinite(ece) else ""
    ax.set_title("reliability" + shown)
    ax.legend(loc="upper left", fontsize="small")
    _save(figure, path)


def plot_learning_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Rows of metrics.csv (epoch, train_loss, val_loss, val_accuracy, ...) → loss and validation PNG."""
    # fixed margins: redrawn every epoch, a layout engine costs more than the plot
    figure = Figure(figsize=(10.0, 4.0))
    loss_ax, metric_ax = figure.subplots(
        1, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    )
    epochs = [row["epoch"] for row in history]

    def series(key: str) -> list[float] | None:
        values = [row.get(key, math.nan) for row in history]
        return values if any(math.isfinite(v) for v in values) else None

    for ax, keys, ylabel in (
        (loss_ax, [("train_loss", "train"), ("val_loss", "validation")], "loss"),
        (
            metric_ax,
            [
                ("val_accuracy", "accuracy"),
                ("val_balanced_accuracy", "balanced accuracy"),
                ("val_auroc", "AUROC"),
            ],
            "validation",
        ),
    ):
        drawn = False
        for key, label in keys:
            values = series(key)
            if values is not None:
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5, 0.5, "no validation metrics", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    metric_ax.set_ylim(-0.02, 1.02)
    loss_ax.set_title("loss")
    metric_ax.set_title("validation metrics")
    _save(figure, path)

"""`volumetric-evaluate`: a checkpoint on a labelled data set → metrics.json, predictions.csv and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from volumetric.atomic_files import atomic_write_csv, atomic_write_text
from volumetric.checkpoint import load_checkpoint, model_from_checkpoint
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices, discover
from volumetric.device import autocast_dtype, resolve_device
from volumetric.evaluation.metrics import evaluation_report, roc_curves
from volumetric.evaluation.plots import plot_confusion_matrix, plot_roc
from volumetric.evaluation.predict import predict
from volumetric.evaluation.rows import PredictionTable
from volumetric.transforms import build_preprocessing


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a labelled data set (see ``evaluation_report``).

    Writes to output_dir: metrics.json, predictions.csv, confusion_matrix.png and roc.png. The
    AUROC confidence interval is a ``bootstrap_resamples``-fold bootstrap seeded with ``seed``.
    """
    state = load_checkpoint(checkpoint)
    class_names = state["class_names"]
    pairs = class_indices(discover(data), class_names, data)
    settings = state["preprocessing"]
    dataset = ScanDataset(
        pairs,
        build_preprocessing(settings, settings["patch_size"]),
        in_channels=state["model_args"].get("in_channels", 1),
    )
    run_device = resolve_device(device)
    model = model_from_checkpoint(state, checkpoint).to(run_device)
    result = predict(
        model,
        DataLoader(dataset, batch_size=1),
        run_device,
        autocast_dtype(run_device, precision),
        progress=progress,
    )
    metrics = evaluation_report(
        result.probs,
        result.labels,
        class_names,
        loss=result.loss,
        bootstrap_resamples=bootstrap_resamples,
        seed=seed,
    )
    output_dir = Path(output_dir)
    atomic_write_text(
        output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    )
    plot_confusion_matrix(
        metrics["confusion_matrix"]["matrix"], class_names, output_dir / "confusion_matrix.png"
    )
    plot_roc(
        roc_curves(result.probs, result.labels),
        class_names,
        output_dir / "roc.png",
        macro_auroc=metrics["auroc"],
        note=metrics["auroc_note"],
    )
    table = PredictionTable(class_names, labelled=True)
    rows = [
        table.row(pairs[index][0], probs, label=label)
        for probs, label, index in zip(
            result.probs.tolist(), result.labels.tolist(), result.indices.tolist()
        )
    ]
    atomic_write_csv(output_dir / "predictions.csv", table.header(), rows)
    return metrics

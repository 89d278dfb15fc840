"""`volumetric-evaluate`: a checkpoint on a labelled data set → metrics.json, predictions.csv and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from volumetric.atomic_files import atomic_write_csv, atomic_write_text
from volumetric.data.cache import disk_cache_for
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices, discover
from volumetric.data.loading import loader_options, resolve_workers
from volumetric.evaluation.metrics import evaluation_report, roc_curves
from volumetric.evaluation.plots import plot_confusion_matrix, plot_roc
from volumetric.evaluation.predict import predict
from volumetric.evaluation.rows import PredictionTable
from volumetric.inference import load_model

EVAL_BATCH = 4
"""Scans per forward pass when the checkpoint crops or pads every scan to one shape."""


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
    cache: str = "disk",
    cache_dir: str | Path | None = None,
    num_workers: int | str = "auto",
) -> dict[str, Any]:
    """Metrics of a checkpoint on a labelled data set (see ``evaluation_report``).

    Writes to output_dir: metrics.json, predictions.csv, confusion_matrix.png and roc.png. The
    AUROC confidence interval is a ``bootstrap_resamples``-fold bootstrap seeded with ``seed``.
    Scans are read by ``num_workers`` processes and, with ``cache="disk"``, preprocessed once
    into the disk cache (volumetric/data/cache.py), which training of the same preprocessing
    shares.
    """
    loaded = load_model(checkpoint, device=device, precision=precision)
    class_names = loaded.class_names
    pairs = class_indices(discover(data, channels=loaded.channels), class_names, data)
    disk = disk_cache_for(cache, cache_dir, loaded.settings, loaded.in_channels)
    dataset = ScanDataset(
        pairs, loaded.preprocessing, cache=cache, disk_cache=disk, in_channels=loaded.in_channels
    )
    same_shape = loaded.settings.get("target_shape") is not None
    options = loader_options(resolve_workers(num_workers), loaded.device.type == "cuda")
    loader = DataLoader(dataset, batch_size=EVAL_BATCH if same_shape else 1, **options)
    result = predict(loaded.model, loader, loaded.device, loaded.dtype, progress=progress)
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

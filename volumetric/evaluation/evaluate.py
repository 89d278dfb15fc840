"""`volumetric-evaluate`: a checkpoint on a labelled data set → metrics.json, predictions.csv, plots
and report.html; and the same report for the validation scans at the end of a training run."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from volumetric.atomic_files import atomic_write_csv, atomic_write_text
from volumetric.checkpoint import load_checkpoint
from volumetric.data.cache import disk_cache_for
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices, discover
from volumetric.data.guard import evaluable
from volumetric.data.loading import (
    DEFAULT_LOADING,
    LoadingOptions,
    loader_options,
    resolve_workers,
)
from volumetric.data.source import Entry
from volumetric.data.split import hashed_in
from volumetric.evaluation.metrics import evaluation_report, roc_curves
from volumetric.evaluation.plots import plot_confusion_matrix, plot_reliability, plot_roc
from volumetric.evaluation.predict import Predictions, predict
from volumetric.evaluation.report import REPORT_NAME, ReportOptions, TrainingRecord, write_report
from volumetric.evaluation.rows import PredictionTable
from volumetric.inference import LoadedModel, load_model

log = logging.getLogger(__name__)

EVAL_BATCH = 4
"""Scans per forward pass when the checkpoint crops or pads every scan to one shape."""


@dataclass
class Evaluation:
    """A checkpoint's predictions on a labelled data set, and their metrics."""

    loaded: LoadedModel
    items: list[tuple[Any, int]]  # (scan source, class index), in the data set's order
    predictions: Predictions  # rows in loader order; .indices are positions in items
    metrics: dict[str, Any]  # what metrics.json holds (`evaluation_report`)

    def in_item_order(self) -> tuple[np.ndarray, np.ndarray]:
        """probs (N, C) float64 and labels (N,) int64, row i for items[i]."""
        order = self.predictions.indices.argsort()  # (N,)
        probs = self.predictions.probs[order].double().numpy()
        return probs, self.predictions.labels[order].numpy()


def evaluate_items(
    loaded: LoadedModel,
    pairs: list[tuple[Any, int]],
    *,
    loading: LoadingOptions = DEFAULT_LOADING,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
    groups: list[str | None] | None = None,
) -> Evaluation:
    """Predict every (scan, class index) pair with ``loaded`` and compute the metrics; ``groups``
    (one per pair, None: none) make the AUROC bootstrap draw groups rather than scans."""
    cache = loading.cache
    disk = disk_cache_for(cache, loading.cache_dir, loaded.settings, loaded.in_channels)
    dataset = ScanDataset(
        pairs, loaded.preprocessing, cache=cache, disk_cache=disk, in_channels=loaded.in_channels
    )
    same_shape = loaded.settings.get("target_shape") is not None
    options = loader_options(resolve_workers(loading.num_workers), loaded.device.type == "cuda")
    loader = DataLoader(dataset, batch_size=EVAL_BATCH if same_shape else 1, **options)
    result = predict(
        loaded.model,
        loader,
        loaded.device,
        loaded.dtype,
        progress=loading.progress,
        temperature=loaded.decision.temperature,
    )
    metrics = evaluation_report(
        result.probs,
        result.labels,
        loaded.class_names,
        loss=result.loss,
        bootstrap_resamples=bootstrap_resamples,
        seed=seed,
        groups=[groups[i] for i in result.indices.tolist()] if groups else None,
        decision=loaded.decision,
    )
    return Evaluation(loaded, pairs, result, metrics)


def write_plots(evaluation: Evaluation, directory: Path) -> dict[str, Path]:
    """confusion_matrix.png, roc.png and reliability.png in ``directory``; their paths by name
    ("confusion_matrix", "roc", "reliability")."""
    metrics, names, result = (
        evaluation.metrics,
        evaluation.loaded.class_names,
        evaluation.predictions,
    )
    paths = {name: directory / f"{name}.png" for name in ("confusion_matrix", "roc", "reliability")}
    plot_confusion_matrix(metrics["confusion_matrix"]["matrix"], names, paths["confusion_matrix"])
    plot_roc(
        roc_curves(result.probs, result.labels),
        names,
        paths["roc"],
        macro_auroc=metrics["auroc"],
        note=metrics["auroc_note"],
    )
    plot_reliability(metrics["reliability"], metrics["ece"], paths["reliability"])
    return paths


def evaluate_checkpoint(
    checkpoint: str | Path | Sequence[str | Path],
    data: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    loading: LoadingOptions = DEFAULT_LOADING,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
    report: ReportOptions | None = None,
    allow_modality_mismatch: bool = False,
) -> dict[str, Any]:
    """Metrics of a checkpoint, or of an ensemble of several (or of a --folds run's folder), on a
    labelled data set (see ``evaluation_report``).

    Writes to output_dir: metrics.json, predictions.csv, confusion_matrix.png, roc.png and, with
    ``report``, report.html (volumetric/evaluation/report.py). The AUROC confidence interval is a
    ``bootstrap_resamples``-fold bootstrap seeded with ``seed``. Scans are read as ``loading``
    says: by its worker processes and, with its disk cache, preprocessed once into the cache
    (volumetric/data/cache.py), which training of the same preprocessing shares.

    When the data names groups (a manifest's ``group`` column): the bootstrap draws groups,
    predictions.csv gets a ``group`` column, and a warning is logged when test scans belong to
    groups of the checkpoint's training split (`warn_of_training_groups`).

    Scans the model would refuse in use are not scored (`evaluable`): DICOM series its training's
    series filter leaves out are left out with a warning; scans of another modality than the
    training scans' stop the evaluation with an error unless ``allow_modality_mismatch``.
    """
    loaded = load_model(
        checkpoint,
        device=device,
        precision=precision,
        allow_modality_mismatch=allow_modality_mismatch,
    )
    class_names = loaded.class_names
    entries = evaluable(loaded.guard, discover(data, channels=loaded.channels))
    pairs = class_indices(entries, class_names, data)
    groups = [e.group for e in entries] if any(e.group is not None for e in entries) else None
    if groups:
        for member in loaded.members:
            warn_of_training_groups(member, entries)
    evaluation = evaluate_items(
        loaded,
        pairs,
        loading=loading,
        bootstrap_resamples=bootstrap_resamples,
        seed=seed,
        groups=groups,
    )
    metrics, result = evaluation.metrics, evaluation.predictions
    output_dir = Path(output_dir)
    atomic_write_text(
        output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    )
    plots = write_plots(evaluation, output_dir)
    table = PredictionTable(class_names, labelled=True, decision=loaded.decision)
    rows = [
        table.row(pairs[index][0], probs, label=label)
        for probs, label, index in zip(
            result.probs.tolist(), result.labels.tolist(), result.indices.tolist()
        )
    ]
    header = table.header()
    if groups:  # a group column after the label
        at = header.index("label") + 1
        header.insert(at, "group")
        for row, index in zip(rows, result.indices.tolist()):
            row.insert(at, groups[index] or "")
    atomic_write_csv(output_dir / "predictions.csv", header, rows)
    if report is not None:
        write_report(
            output_dir / REPORT_NAME,
            evaluation,
            plots,
            report,
            source=str(data),
            progress=loading.progress,
        )
    return metrics


def warn_of_training_groups(checkpoint: Path, entries: list[Entry], shown: int = 3) -> int:
    """Log one warning when scans of ``entries`` belong to groups the checkpoint's training split
    held (its salted group hashes, volumetric/data/split.py); the number of such scans."""
    record = load_checkpoint(checkpoint).training_groups
    if record is None:
        log.info(
            "%s records no training groups: no check for patients seen in training", checkpoint
        )
        return 0
    seen = [e for e, hit in zip(entries, hashed_in(record, [e.group for e in entries])) if hit]
    if seen:
        named = ", ".join(str(e.source.path) for e in seen[:shown])
        more = f", ... ({len(seen) - shown} more)" if len(seen) > shown else ""
        log.warning(
            "%d of %d test scans (%d group(s)) belong to groups in the training split of %s: "
            "the metrics are not held-out (%s%s)",
            len(seen),
            len(entries),
            len({e.group for e in seen}),
            checkpoint,
            named,
            more,
        )
    return len(seen)


def report_after_training(
    loaded: LoadedModel,
    val_pairs: list[tuple[Any, int]],
    training: TrainingRecord,
    options: ReportOptions,
    *,
    loading: LoadingOptions = DEFAULT_LOADING,
) -> Path | None:
    """report.html in the run folder: ``loaded`` (best.pt) on the validation scans, as
    `evaluate_checkpoint` would report it, plus the training curves. None without validation
    scans."""
    if not val_pairs:
        log.info("no validation scans: no %s", REPORT_NAME)
        return None
    evaluation = evaluate_items(loaded, val_pairs, loading=loading)
    path = training.run_dir / REPORT_NAME
    with tempfile.TemporaryDirectory(prefix="volumetric-report-") as folder:
        plots = write_plots(evaluation, Path(folder))
        write_report(
            path,
            evaluation,
            plots,
            options,
            source="",
            training=training,
            progress=loading.progress,
        )
    log.info("report of best.pt (epoch %d) on the validation scans: %s", training.best_epoch, path)
    return path

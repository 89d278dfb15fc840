"""Running a model over a data set: class probabilities, loss and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from transforms import build_preprocessing
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices, discover
from volumetric.device import autocast, autocast_dtype, resolve_device
from volumetric.engine.checkpoint import load_checkpoint, model_from_checkpoint
from volumetric.engine.metrics import classification_metrics, evaluation_report, roc_curves
from volumetric.engine.plots import plot_confusion_matrix, plot_roc
from volumetric.io import atomic_write_csv, atomic_write_text


@dataclass
class Predictions:
    probs: torch.Tensor  # (N, num_classes) float32, rows sum to 1
    labels: torch.Tensor  # (N,) int64 class indices
    indices: torch.Tensor  # (N,) dataset indices, in the order of the rows
    loss: float  # mean cross-entropy (no smoothing)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, **classification_metrics(self.probs, self.labels)}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> Predictions:
    """Probabilities for every item of ``loader`` (model switched to eval mode)."""
    model.eval()
    probs, labels, indices, loss_sum = [], [], [], 0.0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)  # (B, C, W, H, D)
        target = batch["label"].to(device)
        with autocast(device, dtype):
            logits = model(images)  # (B, num_classes)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(target.cpu())
        indices.append(batch["index"])
    n = sum(len(t) for t in labels)
    return Predictions(
        torch.cat(probs), torch.cat(labels), torch.cat(indices), loss_sum / max(n, 1)
    )


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
    rows = []
    for probs, label, index in zip(
        result.probs.tolist(), result.labels.tolist(), result.indices.tolist()
    ):
        best = max(range(len(probs)), key=probs.__getitem__)
        rows.append(
            [
                str(pairs[index][0]),
                class_names[label],
                class_names[best],
                *(f"{p:.6f}" for p in probs),
            ]
        )
    atomic_write_csv(
        output_dir / "predictions.csv",
        ["path", "label", "prediction", *(f"prob_{c}" for c in class_names)],
        rows,
    )
    return metrics

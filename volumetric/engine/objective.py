"""What a run optimizes, and how its epochs are judged: the one thing that tells training a
classifier (`Classification`) from pretraining an encoder (volumetric/engine/pretrain.py). The
loop of volumetric/engine/train.py (steps, accumulation, schedule, signals, resume, DDP,
checkpoints, logs) is the same for both and asks the run's objective for:

    loss(run, batch, epoch)      the batch's loss (a scalar tensor to backpropagate) and its scans
    validate(run, progress)      the validation metrics of the epoch (metrics.csv's val_ columns)
    score(row)                   how good an epoch's metrics row is (greater is better)
    columns, select, judged_by   metrics.csv's columns; the val_ metric that picks the best epoch,
                                 and how the log names it
    best_name, saved_model       the file of the best weights and the module whose weights go there
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from volumetric.engine.distributed import all_gather, all_reduce_sum
from volumetric.evaluation.predict import Predictions, predict

if TYPE_CHECKING:
    from collections.abc import Sized

    from volumetric.engine.setup import Run

CLASSIFICATION_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_auroc",
    "seconds",
]


class Objective(Protocol):
    columns: list[str]
    select: str
    best_name: str

    @property
    def judged_by(self) -> str: ...  # what picks the best epoch, as the log says it

    def loss(self, run: Run, batch: dict[str, Any], epoch: int) -> tuple[Tensor, int]: ...

    def validate(self, run: Run, *, progress: bool) -> dict[str, float]: ...

    def score(self, row: dict[str, float]) -> list[float]: ...

    def saved_model(self, run: Run, *, resumable: bool) -> nn.Module: ...


def selection_score(row: dict[str, float], select: str) -> list[float]:
    """How good the epoch of a metrics row is for best.pt, by ``train.select``; greater is better
    (lists compare item by item, the second breaks ties):

        balanced_accuracy   [balanced accuracy, -loss]
        auroc               [AUROC, -loss]
        loss                [-loss, balanced accuracy]

    Undefined (NaN) values count as -inf. Without validation the latest epoch is best."""
    if "val_loss" not in row:
        return [row["epoch"] - 1, 0.0]
    loss, balanced = -row["val_loss"], row.get("val_balanced_accuracy", math.nan)
    score = {
        "balanced_accuracy": [balanced, loss],
        "auroc": [row.get("val_auroc", math.nan), loss],
        "loss": [loss, balanced],
    }[select]
    return [v if math.isfinite(v) else -math.inf for v in score]


@dataclass(frozen=True)
class Classification:
    """Cross-entropy of the model's logits (the run's criterion: label smoothing, class weights);
    validation metrics from the predicted probabilities; best.pt by ``select``."""

    select: str = "balanced_accuracy"
    columns = CLASSIFICATION_COLUMNS
    best_name = "best.pt"

    @property
    def judged_by(self) -> str:
        return f"train.select={self.select}"

    def loss(self, run: Run, batch: dict[str, Any], epoch: int) -> tuple[Tensor, int]:
        images = batch["image"].to(run.device, non_blocking=True)  # (B, C, W, H, D)
        labels = batch["label"].to(run.device)  # (B,)
        with run.autocast():
            logits = run.train_model(images)  # (B, num_classes)
        assert run.criterion is not None  # a classification run has one
        return run.criterion(logits.float(), labels), len(labels)

    def validate(self, run: Run, *, progress: bool) -> dict[str, float]:
        return validate(run, progress=progress).metrics()

    def score(self, row: dict[str, float]) -> list[float]:
        return selection_score(row, self.select)

    def saved_model(self, run: Run, *, resumable: bool) -> nn.Module:
        return run.model


def validate(run: Run, *, progress: bool) -> Predictions:
    """Predictions for the whole validation set, on every process: each predicts its own shard
    (no scan twice), then the rows of all processes are gathered and put in dataset order."""
    model, loader, device, dtype = run.model, run.val_loader, run.device, run.dtype
    if not run.world.distributed:
        return predict(model, loader, device, dtype, progress=progress, desc="validate")
    num_classes = len(run.class_names)
    if len(cast("Sized", loader.sampler)):  # strided_shard's list
        mine = predict(model, loader, device, dtype, progress=progress, desc="validate")
        probs, labels, indices = mine.probs, mine.labels, mine.indices  # (n_r, classes), (n_r,) ×2
        loss_sum = mine.loss * len(labels)
    else:  # more processes than validation scans: this one has none
        probs, labels, indices = torch.zeros(0, num_classes), *torch.zeros(2, 0, dtype=torch.int64)
        loss_sum = 0.0
    indices = torch.cat(all_gather(indices.to(torch.int64)))  # (N,)
    order = indices.argsort()
    probs = torch.cat(all_gather(probs.float()))[order]  # (N, num_classes)
    labels = torch.cat(all_gather(labels.to(torch.int64)))[order]  # (N,)
    loss = all_reduce_sum([loss_sum]).item() / max(len(order), 1)
    return Predictions(probs=probs, labels=labels, indices=indices[order], loss=loss)

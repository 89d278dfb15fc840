"""Running a model over a data set: class probabilities and loss, in dataset order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from volumetric.data.loading import batches
from volumetric.device import autocast
from volumetric.evaluation.metrics import classification_metrics


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
    temperature: float | None = None,
) -> Predictions:
    """Probabilities for every item of ``loader`` (model switched to eval mode); the logits are
    divided by ``temperature`` first when one is given (a calibrated model)."""
    model.eval()
    probs, labels, indices, loss_sum = [], [], [], 0.0
    for batch in batches(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        images = batch["image"].to(device, non_blocking=True)  # (B, C, W, H, D)
        target = batch["label"].to(device)
        with autocast(device, dtype):
            logits = model(images)  # (B, num_classes)
        logits = logits.float() / (temperature or 1.0)
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(target.cpu())
        indices.append(batch["index"])
    n = sum(len(t) for t in labels)
    return Predictions(
        torch.cat(probs), torch.cat(labels), torch.cat(indices), loss_sum / max(n, 1)
    )

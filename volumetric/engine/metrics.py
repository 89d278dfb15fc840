"""Classification metrics from predicted probabilities: accuracy, balanced accuracy, macro AUROC."""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import compute_roc_auc


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """probs (N, C) rows summing to 1, labels (N,) class indices → metrics (NaN where undefined).

    balanced_accuracy is the mean recall over the classes present; auroc is MONAI's macro
    one-vs-rest ROC AUC, defined once at least two classes are present.
    """
    num_classes = probs.shape[1]
    predictions = probs.argmax(dim=1)
    present = labels.unique()
    recalls = [(predictions[labels == c] == c).float().mean().item() for c in present.tolist()]
    auroc = math.nan
    if len(present) >= 2:
        onehot = torch.nn.functional.one_hot(labels, num_classes).float()
        with warnings.catch_warnings():  # classes absent from labels give a warning and NaN: averaged out below
            warnings.simplefilter("ignore")
            per_class = compute_roc_auc(probs.float(), onehot, average="none")
        values = [float(a) for a in per_class if not math.isnan(float(a))]
        auroc = sum(values) / len(values) if values else math.nan
    return {
        "accuracy": (predictions == labels).float().mean().item() if len(labels) else math.nan,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else math.nan,
        "auroc": auroc,
    }

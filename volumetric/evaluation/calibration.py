"""How far a model's probabilities can be taken at their word: the Brier score, the expected
calibration error and its reliability diagram.

- Brier score: for two classes the mean squared difference between the positive class's
  probability and the truth (0 or 1), as ``sklearn.metrics.brier_score_loss`` gives it; for more
  classes Brier's own definition, the mean over scans of the squared distance between the
  probability vector and the one-hot truth (between 0 and 2).
- Expected calibration error (ECE, top-label): the scans are binned by the probability of their
  predicted class (``BINS`` equal bins of [0, 1]); in each bin the gap between that mean confidence
  and the share of scans predicted right; ECE is the mean gap, weighted by the bins' scans. A model
  whose 0.8-confident predictions are right four times in five has a gap of 0 there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

BINS = 15


def brier_score(probs: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """probs (N, C), labels (N,) → the Brier score (see the module docstring); NaN for no scan."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    if len(labels) == 0:
        return math.nan
    if probs.shape[1] == 2:
        return float(brier_score_loss(labels == positive, probs[:, positive]))
    onehot = np.eye(probs.shape[1])[labels]  # (N, C)
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """The expected calibration error and its bins: {"ece", "bins": [{low, high, scans,
    confidence, accuracy}, ...]} (confidence and accuracy null in an empty bin); ECE NaN for no
    scan."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    confidence = probs.max(axis=1) if len(labels) else np.zeros(0)  # (N,)
    correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)  # (N,)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # (N,)
    table, gap = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        mean_confidence: float | None = None
        accuracy: float | None = None
        if count:
            mean_confidence = float(confidence[members].mean())
            accuracy = float(correct[members].mean())
            gap += count * abs(mean_confidence - accuracy)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "scans": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    return {"ece": gap / len(labels) if len(labels) else math.nan, "bins": table}

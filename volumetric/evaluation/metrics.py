"""Classification metrics from predicted probabilities, all computed with scikit-learn.

Two entry points:

- ``classification_metrics``: accuracy, balanced accuracy and macro AUROC; cheap, called by the
  training loop after every validation pass.
- ``evaluation_report``: everything ``volumetric-evaluate`` writes to metrics.json: the above plus
  per-class precision/recall/F1/support/AUROC, the confusion matrix and a seeded bootstrap 95%
  confidence interval of the macro AUROC. JSON-ready: undefined values are ``None``, with a reason.

The bootstrap draws scans; when the scans come in groups (e.g. several scans of one patient), it
draws groups, each with all its scans (a cluster bootstrap): scans of one patient are not
independent evidence, and drawing them one by one would make the interval too narrow.

AUROC is one-vs-rest per class; the macro AUROC is the mean over the classes present in the labels
(a class with no scan has no positives, so its curve is undefined). With fewer than two classes
present, AUROC is undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def _arrays(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """probs (N, C), labels (N,) → float64 (N, C) and int64 (N,) numpy arrays."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().double().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def per_class_auroc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """probs (N, C), labels (N,) → (C,) one-vs-rest AUROC per class; NaN for classes absent from labels
    (and for every class when fewer than two are present)."""
    present = np.unique(labels)  # (P,) sorted class indices
    out = np.full(probs.shape[1], math.nan)
    if len(present) >= 2:
        onehot = labels[:, None] == present[None, :]  # (N, P) one-vs-rest targets
        out[present] = roc_auc_score(onehot, probs[:, present], average=None)
    return out


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the classes present in labels; NaN with fewer than two present."""
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    onehot = labels[:, None] == present[None, :]  # (N, P)
    return float(roc_auc_score(onehot, probs[:, present], average="macro"))


def classification_metrics(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> dict[str, float]:
    """probs (N, C) rows summing to 1, labels (N,) class indices → metrics (NaN where undefined).

    balanced_accuracy is the mean recall over the classes present in labels; auroc is the macro
    one-vs-rest AUROC, defined once at least two classes are present.
    """
    p, y = _arrays(probs, labels)
    if len(y) == 0:
        return {"accuracy": math.nan, "balanced_accuracy": math.nan, "auroc": math.nan}
    predictions = p.argmax(axis=1)  # (N,)
    # "y_pred contains classes not in y_true": those are left out, as intended
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, predictions))
    return {
        "accuracy": float(accuracy_score(y, predictions)),
        "balanced_accuracy": balanced,
        "auroc": macro_auroc(p, y),
    }


def bootstrap_auroc(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap confidence interval of the macro AUROC: scans drawn with replacement;
    with ``groups`` naming any group (one per scan, None: a scan of its own), groups drawn with
    replacement, all scans of each (``unit`` says which, ``groups`` counts them).

    A resample that misses one of the classes present in ``labels`` is skipped (its macro AUROC would
    average other classes, or be undefined); ``used`` counts the rest. ``low``/``high`` are NaN when
    no resample is usable. Seeded with its own generator: the global RNGs are left untouched.
    """
    present = np.unique(labels)
    rng = np.random.default_rng(seed)
    clusters = (
        _clusters(groups) if groups is not None and any(g is not None for g in groups) else None
    )
    values = []
    if len(present) >= 2:
        for _ in range(resamples):
            if clusters is None:  # (N,) scans drawn with replacement
                idx = rng.integers(0, len(labels), size=len(labels))
            else:  # (M,) the scans of G groups drawn with replacement
                idx = np.concatenate(
                    [clusters[g] for g in rng.integers(0, len(clusters), size=len(clusters))]
                )
            sample = labels[idx]  # (N,) or (M,)
            if len(np.unique(sample)) == len(present):
                values.append(macro_auroc(probs[idx], sample))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail]) if values else (math.nan, math.nan)
    return {
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": resamples,
        "used": len(values),
        "seed": seed,
        "unit": "scan" if clusters is None else "group",
        **({} if clusters is None else {"groups": len(clusters)}),
    }


def _clusters(groups: Sequence[str | None]) -> list[np.ndarray]:
    """The scan indices of each group, in order of first appearance; a scan without one is alone."""
    members: dict[Any, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(("group", group) if group is not None else ("scan", i), []).append(i)
    return [np.asarray(m, dtype=np.int64) for m in members.values()]


def roc_curves(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curve per class present: {class index: (fpr (K,), tpr (K,), AUROC)}.

    Two classes give one curve, for the positive (second) class. Empty when AUROC is undefined.
    """
    p, y = _arrays(probs, labels)
    aurocs = per_class_auroc(p, y)
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    curves = {}
    for c in classes:
        if not math.isnan(aurocs[c]):
            fpr, tpr, _ = roc_curve(y == c, p[:, c])
            curves[c] = (fpr, tpr, float(aurocs[c]))
    return curves


def _json_number(value: float) -> float | None:
    """NaN and infinities are not JSON: they become null."""
    return float(value) if math.isfinite(value) else None


def evaluation_report(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    *,
    loss: float | None = None,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """probs (N, C), labels (N,) → the JSON-ready metrics of ``volumetric-evaluate``.

    Keys: num_scans, loss, accuracy, balanced_accuracy, auroc, auroc_ci95 ([low, high] or null),
    auroc_bootstrap (resamples, used, seed, level, unit: "scan", or "group" and the number of
    ``groups``), auroc_note (why auroc or its interval is null, else null), class_names,
    per_class ({name: precision, recall, f1, support, auroc}) and confusion_matrix (rows: true
    class, columns: predicted class, both in class_names order).
    Precision of a class never predicted, and recall of a class absent from labels, are null.
    ``groups`` (one per scan; None: a scan of its own) naming any group make the bootstrap draw
    groups (see `bootstrap_auroc`).
    """
    p, y = _arrays(probs, labels)
    num_classes = len(class_names)
    if p.ndim != 2 or p.shape[1] != num_classes or len(y) != len(p):
        raise ValueError(
            f"probs {tuple(p.shape)} and labels {tuple(y.shape)} do not fit {num_classes} classes"
        )
    predictions = p.argmax(axis=1)  # (N,)
    basic = classification_metrics(p, y)
    class_ids = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predictions, labels=class_ids, zero_division=np.nan
    )
    aurocs = per_class_auroc(p, y)
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"{len(groups)} groups for {len(y)} scans")
    interval = bootstrap_auroc(p, y, resamples=bootstrap_resamples, seed=seed, groups=groups)

    present = [class_names[c] for c in np.unique(y)]
    if len(y) == 0:
        note = "no scans: AUROC is undefined"
    elif len(present) < 2:
        note = f"only one class ({present[0]}) in the data: AUROC is undefined"
    elif interval["used"] == 0:
        note = f"no bootstrap resample held all {len(present)} classes: no confidence interval"
    else:
        note = None
    ci = [interval["low"], interval["high"]] if interval["used"] else None
    return {
        "num_scans": int(len(y)),
        "loss": _json_number(loss) if loss is not None else None,
        "accuracy": _json_number(basic["accuracy"]),
        "balanced_accuracy": _json_number(basic["balanced_accuracy"]),
        "auroc": _json_number(basic["auroc"]),
        "auroc_ci95": ci,
        "auroc_bootstrap": {
            k: interval[k]
            for k in ("resamples", "used", "seed", "level", "unit", "groups")
            if k in interval
        },
        "auroc_note": note,
        "class_names": list(class_names),
        "per_class": {
            name: {
                "precision": _json_number(precision[c]),
                "recall": _json_number(recall[c]),
                "f1": _json_number(f1[c]),
                "support": int(support[c]),
                "auroc": _json_number(aurocs[c]),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": {
            "labels": list(class_names),
            "rows": "true class",
            "columns": "predicted class",
            "matrix": confusion_matrix(y, predictions, labels=class_ids).tolist(),
        },
    }

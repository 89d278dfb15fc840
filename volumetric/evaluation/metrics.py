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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from volumetric.evaluation.calibration import brier_score, reliability
from volumetric.evaluation.decision import ARGMAX, Decision

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


def per_class_pr_auc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """probs (N, C), labels (N,) → (C,) one-vs-rest area under the precision-recall curve (average
    precision) per class; NaN for classes absent from labels. Unlike the AUROC it depends on how
    rare the class is: a random model scores the class's share of the scans."""
    out = np.full(probs.shape[1], math.nan)
    for c in np.unique(labels):
        out[c] = average_precision_score(labels == c, probs[:, c])
    return out


def operating_point(predictions: np.ndarray, labels: np.ndarray, positive: int) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV of two-class ``predictions`` (N,) against ``labels``
    (N,), ``positive`` the positive class; NaN where a denominator is 0."""
    predicted, actual = predictions == positive, labels == positive
    tp, fp = int((predicted & actual).sum()), int((predicted & ~actual).sum())
    tn, fn = int((~predicted & ~actual).sum()), int((~predicted & actual).sum())

    def share(a: int, b: int) -> float:
        return a / (a + b) if a + b else math.nan

    return {
        "sensitivity": share(tp, fn),
        "specificity": share(tn, fp),
        "ppv": share(tp, fp),
        "npv": share(tn, fn),
    }


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
    clusters = _clusters_of(groups)
    values = []
    if len(present) >= 2:
        for idx in _resamples(len(labels), clusters, resamples, seed):
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


def _clusters_of(groups: Sequence[str | None] | None) -> list[np.ndarray] | None:
    """`_clusters` of ``groups`` when they name any group, else None (the scans alone)."""
    if groups is None or all(g is None for g in groups):
        return None
    return _clusters(groups)


def _resamples(
    n: int, clusters: list[np.ndarray] | None, resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Bootstrap index arrays: ``n`` scans drawn with replacement, or, with ``clusters``, the
    scans of as many groups drawn with replacement; from a generator of their own."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        if clusters is None:
            yield rng.integers(0, n, size=n)  # (N,)
        else:  # (M,) the scans of G groups
            yield np.concatenate(
                [clusters[g] for g in rng.integers(0, len(clusters), size=len(clusters))]
            )


def bootstrap_operating_point(
    predictions: np.ndarray,
    labels: np.ndarray,
    positive: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
    groups: Sequence[str | None] | None = None,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of `operating_point`'s four rates, drawn as
    `bootstrap_auroc` draws (scans, or groups); a rate undefined in a resample (no positive scan,
    say) leaves that resample out of its interval; None when no resample defines it."""
    clusters = _clusters_of(groups)
    draws: dict[str, list[float]] = {}
    for idx in _resamples(len(labels), clusters, resamples, seed):
        for key, value in operating_point(predictions[idx], labels[idx], positive).items():
            if math.isfinite(value):
                draws.setdefault(key, []).append(value)
    tail = (1.0 - level) / 2.0
    return {
        key: [float(v) for v in np.quantile(draws[key], [tail, 1.0 - tail])]
        if draws.get(key)
        else None
        for key in ("sensitivity", "specificity", "ppv", "npv")
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
    decision: Decision = ARGMAX,
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

    Predictions follow ``decision`` (the model's operating point: the arg max, or a threshold on
    the positive class of two; volumetric/evaluation/decision.py), and so do accuracy, balanced
    accuracy, precision, recall and the confusion matrix. Also: pr_auc (macro one-vs-rest area
    under the precision-recall curve; per class in per_class), brier and ece with its reliability
    bins (volumetric/evaluation/calibration.py), and for two classes operating_point: the
    positive class, rule, threshold, and sensitivity, specificity, PPV and NPV with bootstrap
    intervals (``<name>_ci95``).
    """
    p, y = _arrays(probs, labels)
    num_classes = len(class_names)
    if p.ndim != 2 or p.shape[1] != num_classes or len(y) != len(p):
        raise ValueError(
            f"probs {tuple(p.shape)} and labels {tuple(y.shape)} do not fit {num_classes} classes"
        )
    predictions = decision.predict(p) if len(y) else np.zeros(0, np.int64)  # (N,)
    class_ids = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predictions, labels=class_ids, zero_division=np.nan
    )
    aurocs = per_class_auroc(p, y)
    pr_aucs = per_class_pr_auc(p, y)
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
    with warnings.catch_warnings():  # classes predicted but absent from labels: left out
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, predictions)) if len(y) else math.nan
    calibration = reliability(p, y)
    present_pr = [v for v in pr_aucs if math.isfinite(v)]
    return {
        "num_scans": int(len(y)),
        "loss": _json_number(loss) if loss is not None else None,
        "accuracy": _json_number(float(accuracy_score(y, predictions)) if len(y) else math.nan),
        "balanced_accuracy": _json_number(balanced),
        "auroc": _json_number(macro_auroc(p, y) if len(y) else math.nan),
        "auroc_ci95": ci,
        "auroc_bootstrap": {
            k: interval[k]
            for k in ("resamples", "used", "seed", "level", "unit", "groups")
            if k in interval
        },
        "auroc_note": note,
        "pr_auc": _json_number(float(np.mean(present_pr)) if present_pr else math.nan),
        "brier": _json_number(brier_score(p, y, decision.positive)),
        "ece": _json_number(calibration["ece"]),
        "reliability": calibration["bins"],
        "temperature": decision.temperature,
        "class_names": list(class_names),
        "per_class": {
            name: {
                "precision": _json_number(precision[c]),
                "recall": _json_number(recall[c]),
                "f1": _json_number(f1[c]),
                "support": int(support[c]),
                "auroc": _json_number(aurocs[c]),
                "pr_auc": _json_number(pr_aucs[c]),
            }
            for c, name in enumerate(class_names)
        },
        **(
            {
                "operating_point": _operating_point_report(
                    predictions, y, class_names, decision, bootstrap_resamples, seed, groups
                )
            }
            if num_classes == 2
            else {}
        ),
        "confusion_matrix": {
            "labels": list(class_names),
            "rows": "true class",
            "columns": "predicted class",
            "matrix": confusion_matrix(y, predictions, labels=class_ids).tolist(),
        },
    }


def _operating_point_report(
    predictions: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    decision: Decision,
    resamples: int,
    seed: int,
    groups: Sequence[str | None] | None,
) -> dict[str, Any]:
    """metrics.json's operating_point of a two-class model (see `evaluation_report`)."""
    rates = operating_point(predictions, labels, decision.positive)
    intervals = bootstrap_operating_point(
        predictions, labels, decision.positive, resamples=resamples, seed=seed, groups=groups
    )
    return {
        "positive_class": class_names[decision.positive],
        "rule": decision.rule,
        "threshold": decision.threshold if decision.threshold is not None else 0.5,
        **{k: _json_number(v) for k, v in rates.items()},
        **{f"{k}_ci95": v for k, v in intervals.items()},
    }

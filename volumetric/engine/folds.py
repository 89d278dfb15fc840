"""K-fold cross-validation: ``volumetric-train DATA --folds K --output-dir RUN``.

The scans are split into K folds by scikit-learn's StratifiedGroupKFold (seeded by
``train.seed``): every patient group wholly in one fold, each fold's class mix as close to the
whole's as groups allow, and every class in every fold's training and validation part (else one
error line naming the fold and the class). Fold k trains in ``RUN/fold-k`` as an ordinary run with
fold k as its validation data (best.pt, last.pt, split.csv, metrics.csv, its operating point), so
each fold is resumable: running the same command again finishes what is missing, a fold killed
mid-epoch continuing from its last.pt to the weights it would have reached.

When every fold is done, ``RUN`` gets

    oof_predictions.csv   every scan, predicted by the fold model that did not train on it
    folds.json            the members (fold-k/best.pt), the ensemble's operating point (fitted on
                          the out-of-fold predictions), each fold's validation metrics, their
                          mean ± sd, and the metrics of the out-of-fold predictions pooled
    summary.md            the same as a table

and ``RUN`` itself is a model: ``volumetric-infer RUN scans/`` and ``volumetric-evaluate RUN
test/`` use the K fold models as an ensemble (volumetric/ensemble.py).

Under torchrun every process trains every fold, in one process group held for all K (each fold
an ordinary distributed run); what depends on files (the plan, whether a fold is done) is decided
by rank 0 and shared, so the processes never disagree, and rank 0 alone writes the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from volumetric.atomic_files import atomic_write_csv, atomic_write_text
from volumetric.checkpoint import load_checkpoint
from volumetric.config import Config, config_to_yaml
from volumetric.data.loading import LoadingOptions
from volumetric.data.source import Entry
from volumetric.engine.decide import positive_index, wants_decision
from volumetric.engine.distributed import all_reduce_max, distributed_session, is_main
from volumetric.engine.train import train
from volumetric.ensemble import FOLDS_FILE
from volumetric.errors import VolumetricError
from volumetric.evaluation.decision import Decision, fit_threshold
from volumetric.evaluation.evaluate import evaluate_items
from volumetric.evaluation.metrics import evaluation_report
from volumetric.evaluation.report import ReportOptions
from volumetric.evaluation.rows import PredictionTable
from volumetric.inference import load_model

log = logging.getLogger(__name__)

PLAN_FILE = "folds_plan.json"
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "auroc", "pr_auc", "loss", "brier", "ece")


def fold_splits(
    labels: list[int], groups: list[str | None], k: int, seed: int, class_names: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(training, validation) indices of each of ``k`` folds: grouped and stratified (module
    docstring); a scan without a group is a group of its own."""
    if k < 2:
        raise VolumetricError(f"--folds {k}: cross-validation needs at least 2 folds")
    keys = [g if g is not None else f"\0scan{i}" for i, g in enumerate(groups)]
    if len(set(keys)) < k:
        raise VolumetricError(f"--folds {k}: only {len(set(keys))} patient groups to split")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than k: the check below names it
        warnings.simplefilter("ignore", UserWarning)
        splits = list(splitter.split(np.zeros(len(labels)), labels, keys))
    folds = []
    for number, (train_idx, val_idx) in enumerate(splits, start=1):
        for part, indices in (("training", train_idx), ("validation", val_idx)):
            missing = sorted(set(range(len(class_names))) - {labels[i] for i in indices})
            if missing:
                raise VolumetricError(
                    f"--folds {k}: fold {number}'s {part} part has no scan of class "
                    f"{', '.join(class_names[m] for m in missing)}; use fewer folds"
                )
        folds.append((sorted(map(int, train_idx)), sorted(map(int, val_idx))))
    return folds


def _plan(config: Config, items: list[Entry], k: int) -> dict[str, Any]:
    """What the folds depend on: a rerun with other data or settings must not mix into RUN."""
    scans = [[str(e.source), e.label, e.group] for e in items]
    return {
        "folds": k,
        "seed": config.train.seed,
        "scans_sha256": hashlib.sha256(json.dumps(scans).encode()).hexdigest(),
        "config_sha256": hashlib.sha256(config_to_yaml(config).encode()).hexdigest(),
    }


def _check_plan(output_dir: Path, plan: dict[str, Any]) -> None:
    path = output_dir / PLAN_FILE
    if path.exists():
        if json.loads(path.read_text()) != plan:
            raise VolumetricError(
                f"{output_dir} holds a --folds run of other data, folds or settings; choose "
                "another --output-dir"
            )
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise VolumetricError(f"{output_dir} is not empty and holds no --folds run")
    else:
        atomic_write_text(path, json.dumps(plan, indent=2) + "\n")


def _fold_done(config: Config, fold_dir: Path) -> bool:
    """Trained to the last epoch, with its operating point when one is asked for."""
    if not (fold_dir / "last.pt").exists() or not (fold_dir / "best.pt").exists():
        return False
    if load_checkpoint(fold_dir / "last.pt").epoch < config.train.epochs:
        return False
    return not wants_decision(config) or load_checkpoint(fold_dir / "best.pt").decision is not None


@dataclass
class FoldsResult:
    output_dir: Path
    summary: dict[str, Any]  # what folds.json holds


def train_folds(
    config: Config,
    items: list[Entry],
    k: int,
    output_dir: str | Path,
    *,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    report: ReportOptions | None = None,
) -> FoldsResult | None:
    """Train the K folds one after the other (each resumed where it stopped), then write the
    out-of-fold predictions and the summary (module docstring). Under torchrun the processes
    other than rank 0 return None once the last fold is trained."""
    output_dir = Path(output_dir)
    class_names = sorted({e.label for e in items if e.label is not None})
    labels = [class_names.index(e.label) for e in items]  # type: ignore[arg-type]
    folds = fold_splits(labels, [e.group for e in items], k, config.train.seed, class_names)
    with distributed_session(config.train.device):
        _check_plan_on_main(output_dir, _plan(config, items, k))
        for number, (train_idx, val_idx) in enumerate(folds, start=1):
            fold_dir = output_dir / f"fold-{number}"
            if _on_main(_fold_done, config, fold_dir):
                log.info("fold %d of %d: done earlier (%s)", number, k, fold_dir)
                continue
            log.info(
                "fold %d of %d: %d training and %d validation scans",
                number,
                k,
                len(train_idx),
                len(val_idx),
            )
            train(
                config,
                [items[i] for i in train_idx],
                [items[i] for i in val_idx],
                fold_dir,
                resume=(fold_dir / "last.pt").exists(),
                progress=progress,
                cache_dir=cache_dir,
                report=report,
            )
    if not is_main():
        return None
    loading = LoadingOptions(config.train.cache, cache_dir, config.train.num_workers, progress)
    summary = summarize(config, items, labels, class_names, folds, output_dir, loading)
    return FoldsResult(output_dir, summary)


def _on_main(decide: Callable[..., bool], *args: Any) -> bool:
    """``decide(*args)`` as rank 0 answers it, in every process (a collective: all must call
    it); the other processes do not call ``decide``."""
    return bool(all_reduce_max([float(is_main() and decide(*args))]).item())


def _check_plan_on_main(output_dir: Path, plan: dict[str, Any]) -> None:
    """`_check_plan` by rank 0 alone (it may write the plan); its refusal raised in every process."""
    problem = ""
    if is_main():
        try:
            _check_plan(output_dir, plan)
        except VolumetricError as error:
            problem = str(error)
    if _on_main(bool, problem):
        raise VolumetricError(problem or f"{output_dir}: refused by rank 0 (its error says why)")


def summarize(
    config: Config,
    items: list[Entry],
    labels: list[int],
    class_names: list[str],
    folds: list[tuple[list[int], list[int]]],
    output_dir: Path,
    loading: LoadingOptions,
) -> dict[str, Any]:
    """Each fold's best.pt on its validation part: out-of-fold probabilities, per-fold metrics;
    the ensemble's operating point from the out-of-fold probabilities; the files."""
    n = len(items)
    oof = np.zeros((n, len(class_names)))
    fold_of = np.zeros(n, dtype=np.int64)
    per_fold = []
    for number, (_, val_idx) in enumerate(folds, start=1):
        loaded = load_model(output_dir / f"fold-{number}" / "best.pt", device=config.train.device)
        pairs = [(items[i].source, labels[i]) for i in val_idx]
        evaluation = evaluate_items(loaded, pairs, loading=loading, seed=config.train.seed)
        probs, _ = evaluation.in_item_order()  # (n_k, C), rows in val_idx order
        oof[val_idx], fold_of[val_idx] = probs, number
        per_fold.append({"fold": number, "scans": len(val_idx), **_subset(evaluation.metrics)})
    decision = _ensemble_decision(config, oof, labels, class_names)
    groups = [e.group for e in items]
    pooled = evaluation_report(
        oof,
        np.asarray(labels),
        class_names,
        seed=config.train.seed,
        groups=groups if any(g is not None for g in groups) else None,
        decision=decision,
    )
    summary = {
        "folds": len(folds),
        "seed": config.train.seed,
        "class_names": class_names,
        "members": [f"fold-{k}/best.pt" for k in range(1, len(folds) + 1)],
        "decision": decision.to_dict(),
        "per_fold": per_fold,
        "mean_sd": {key: _mean_sd([f[key] for f in per_fold]) for key in SUMMARY_KEYS},
        "out_of_fold": pooled,
    }
    _write_oof(
        output_dir / "oof_predictions.csv", items, labels, class_names, oof, fold_of, decision
    )
    atomic_write_text(output_dir / "summary.md", summary_markdown(summary))
    # last: a folder with folds.json is a finished, usable ensemble (volumetric/ensemble.py)
    atomic_write_text(
        output_dir / FOLDS_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n"
    )
    log.info("%d folds: %s", len(folds), output_dir / "summary.md")
    return summary


def _subset(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics.get(key) for key in SUMMARY_KEYS}


def _mean_sd(values: list[float | None]) -> list[float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return [None, None]
    return [statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None]


def _ensemble_decision(
    config: Config, oof: np.ndarray, labels: list[int], class_names: list[str]
) -> Decision:
    """The ensemble's operating point, fitted on the out-of-fold probabilities (the members'
    temperatures are inside them already)."""
    if not wants_decision(config) or len(class_names) != 2:
        return Decision()
    positive = positive_index(config, class_names)
    truth = np.asarray(labels) == positive
    rule = config.train.threshold
    return Decision(positive, fit_threshold(oof[:, positive], truth, rule), rule)


def _write_oof(
    path: Path,
    items: list[Entry],
    labels: list[int],
    class_names: list[str],
    oof: np.ndarray,
    fold_of: np.ndarray,
    decision: Decision,
) -> None:
    table = PredictionTable(class_names, labelled=True, decision=decision)
    header = table.header()
    at = header.index("label") + 1
    header.insert(at, "fold")
    rows = []
    for i, entry in enumerate(items):
        row = table.row(entry.source, oof[i].tolist(), label=labels[i])
        row.insert(at, str(fold_of[i]))
        rows.append(row)
    atomic_write_csv(path, header, rows)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: each fold's validation metrics, their mean ± sd, and the pooled out-of-fold."""

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        f"# {summary['folds']}-fold cross-validation",
        "",
        "| fold | scans | " + " | ".join(SUMMARY_KEYS) + " |",
        "|---|---:|" + "---:|" * len(SUMMARY_KEYS),
    ]
    for fold in summary["per_fold"]:
        values = " | ".join(cell(fold[k]) for k in SUMMARY_KEYS)
        lines.append(f"| {fold['fold']} | {fold['scans']} | {values} |")
    mean_sd = summary["mean_sd"]
    shown = [
        "–" if mean_sd[k][0] is None else f"{mean_sd[k][0]:.3f} ± {cell(mean_sd[k][1])}"
        for k in SUMMARY_KEYS
    ]
    lines.append("| mean ± sd | | " + " | ".join(shown) + " |")
    pooled = summary["out_of_fold"]
    lines.append(
        f"| out-of-fold, pooled | {pooled['num_scans']} | "
        + " | ".join(cell(pooled.get(k)) for k in SUMMARY_KEYS)
        + " |"
    )
    decision = summary["decision"]
    if decision.get("threshold") is not None:
        lines += [
            "",
            f"The ensemble's threshold, {decision['threshold']:.4f} ({decision['rule']}), was "
            "fitted on the out-of-fold predictions.",
        ]
    return "\n".join(lines) + "\n"

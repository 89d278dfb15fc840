#!/usr/bin/env python
"""Accuracy on the demo tasks over several seeds: seq-norm attention against softmax attention, the
other attention variants and MONAI's DenseNet121, with a paired non-inferiority check.

    python scripts/compare.py [--task lesion|regions] [--epochs 30] [--seeds 3]
                              [--models seqnorm softmax seqnorm_qk sima densenet121]
                              [--single-seed-models seqnorm_qk sima densenet121]
                              [--data DIR] [--config YAML] [--runs runs/compare]
                              [--override KEY=VALUE ...] [--output docs/results.md]
                              [--variant NAME KEY=VALUE ... [--variant ...]] [--pair A B]
                              [--validation-only] [--train-data DIR] [--section NAME]
                              [--report-only]

Every model gets the task's data, preprocessing, augmentation, optimiser and epoch budget (the
task's config; only the model and ``train.seed`` change), is trained with volumetric-train, and
its best checkpoint is evaluated with volumetric-evaluate on the held-out test split. Models get
seeds 0 .. N-1 (``--seeds N``), those in ``--single-seed-models`` seed 0 only. The runs go one
after the other (never two trainings at once; a lock file keeps a second compare.py out), each in
its own process so that its peak memory is its own: first the seq-norm and softmax pairs seed by
seed, then the single-seed models.

Each run lives in ``<runs>/<task>/<model>-s<seed>-<epochs>ep``. A finished run is reused, an
interrupted one resumed, a finished one whose test set changed only re-evaluated. As soon as a run
is done its numbers go to ``compare.json`` in its folder and the task's section of the Markdown
output is rewritten from every run finished so far, so an interrupted study loses nothing.
``--report-only`` trains nothing and writes the section from the runs finished with the present
settings (e.g. runs trained in parallel elsewhere, under other ``--runs`` folders, and copied here).

``--variant NAME KEY=VALUE ...`` defines a model of its own, the task's config with those
overrides (e.g. ``--variant ls01 model.layer_scale=0.1``), usable in ``--models`` and ``--pair``;
``--pair A B`` picks the two models of the paired comparison (default: seqnorm softmax).
``--validation-only`` is the screen used to choose settings: nothing is evaluated on the test
scans; each run is read from its metrics.csv (best validation balanced accuracy, the training
loss at epochs 1, 10 and the last), and a form whose training loss is still above
``--loss-limit`` (1.3, ln 4 ≈ 1.39 being chance on four classes) at epoch 10 on any seed is out,
and so is one that does not generalize: a best validation balanced accuracy below halfway from
chance (one over the classes) to 1 on any seed. The second rule catches what the first cannot, a
model that memorizes its training scans (its loss falls fastest).
``--train-data`` trains on another folder than ``<data>/train`` (e.g. a subset of it).

The section gives, per model, the mean and sample standard deviation over seeds of the test
accuracy, balanced accuracy and AUROC and the median time per epoch; then seq-norm minus softmax,
scan by scan on the same test scans and matched by seed: the accuracy difference per seed pair and
pooled over the pairs, a bootstrap 95% interval over scans, McNemar's exact test per pair, and a
non-inferiority verdict against a margin of 2 points of accuracy (non-inferior, inferior or
inconclusive, from the whole interval). The statistics (``paired_bootstrap``, ``mcnemar_exact``,
``verdict``, ``format_mean_sd``) are in volumetric/evaluation/comparison.py; this script runs the
studies and writes their sections.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from volumetric.evaluation.comparison import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    discordant,
    format_mean_sd,
    match_scans,
    mcnemar_exact,
    paired_bootstrap,
    read_correct,
    verdict_sentence,
)

ROOT = Path(__file__).resolve().parent.parent

TASKS: dict[str, dict[str, Any]] = {
    "lesion": {
        "data": ROOT / "data" / "demo",
        "config": ROOT / "configs" / "demo.yaml",
        "title": "Lesion task",
        "what": "lesion vs no lesion, half the scans each",
    },
    "regions": {
        "data": ROOT / "data" / "demo_regions",
        "config": ROOT / "configs" / "demo_regions.yaml",
        "title": "Regions task",
        "what": "every scan carries one lesion and the class is the region holding it: left or "
        "right, frontal or posterior (boxes of MNI coordinates, `configs/demo_regions.yaml`), "
        "four classes of equal size",
    },
}
MODELS = {  # the form written out: runs of another version's defaults are not reused
    "seqnorm": ["--model.attention=seqnorm", "--model.attention_norm=true"],
    "seqnorm_plain": ["--model.attention=seqnorm", "--model.attention_norm=false"],
    "softmax": ["--model.attention=softmax"],
    "seqnorm_qk": ["--model.attention=seqnorm_qk"],
    "sima": ["--model.attention=sima"],
    "densenet121": ["--model.arch=densenet121"],
}
DESCRIPTION = {
    "seqnorm": "seq-norm ViT, Q, K and V normalized, output norm (this method's default form)",
    "seqnorm_plain": "seq-norm ViT, Q, K and V normalized, no output norm (the paper's plain form)",
    "softmax": "softmax ViT (same model, SDPA attention)",
    "seqnorm_qk": "seq-norm ViT, Q and K only",
    "sima": "SimA ViT (L1-normalized Q and K)",
    "densenet121": "MONAI DenseNet121 (3D CNN)",
}
SINGLE_SEED = ["seqnorm_qk", "sima", "densenet121"]
PAIR = ("seqnorm", "softmax")  # the paired comparison: PAIR[0] minus PAIR[1]
TITLE = "# Accuracy: seq-norm attention against softmax, its variants and MONAI DenseNet121"


# ---------------------------------------------------------------------------------------- runs


@dataclass
class Study:
    task: str
    data: Path
    config: Path
    runs: Path  # <runs>/<task>
    epochs: int
    seeds: int
    models: list[str]
    single_seed: list[str]
    overrides: list[str]  # volumetric-train arguments, --section.key=value
    output: Path
    command: str
    resamples: int = BOOTSTRAP_RESAMPLES
    records: dict[tuple[str, int], dict] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)  # name → KEY=VALUE overrides
    pair: tuple[str, str] = PAIR  # the paired comparison: pair[0] minus pair[1]
    validation_only: bool = False  # a screen: read validation metrics, never the test scans
    train_data: Path | None = None  # default: <data>/train
    section: str | None = None  # the report's marker name (default from task and epochs)
    loss_limit: float = 1.3  # a screen's limit on the training loss at epoch 10

    def overrides_of(self, model: str) -> list[str]:
        """The volumetric-train options that make ``model``."""
        if model in self.variants:
            return [f"--{o}" for o in self.variants[model]]
        return list(MODELS[model])

    def describe(self, model: str) -> str:
        if model in self.variants:
            return f"`{model}`: {', '.join(f'`{o}`' for o in self.variants[model])}"
        return DESCRIPTION[model]

    @property
    def pair_labels(self) -> tuple[str, str]:
        """How the text names the paired models: seq-norm and softmax, or the models' names."""
        return ("seq-norm", "softmax") if self.pair == PAIR else self.pair

    @property
    def training_folder(self) -> Path:
        return self.train_data or self.data / "train"

    def plan(self) -> list[tuple[str, int]]:
        """(model, seed) in running order: the paired models seed by seed, then the others."""
        seeded = [m for m in self.models if m not in self.single_seed]
        runs = [(m, s) for s in range(self.seeds) for m in seeded]
        return runs + [(m, 0) for m in self.models if m in self.single_seed]


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the report is committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, content: dict) -> None:
    from volumetric.atomic_files import atomic_write_text

    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def _data_args(data: Path) -> dict | None:
    """The data set's make_demo_data arguments (.demo_args.json), None for other data."""
    return _read_json(data / ".demo_args.json")


def settings_of(study: Study, model: str, seed: int) -> dict[str, Any]:
    """What a run's training and its test evaluation depend on: a change retrains, or re-evaluates."""
    data_args = _data_args(study.data)
    train_data = (
        None if data_args is None else {k: v for k, v in data_args.items() if k != "n_test"}
    )
    return {
        "train": {
            "task": study.task,
            "model": model,
            "seed": seed,
            "epochs": study.epochs,
            "config": _shown(study.config),
            "config_sha256": hashlib.sha256(study.config.read_bytes()).hexdigest(),
            "overrides": [*study.overrides_of(model), *study.overrides],
            "data": _shown(study.training_folder),
            "data_args": train_data,
        },
        "test": None
        if study.validation_only
        else {"data": _shown(study.data / "test"), "data_args": data_args},
    }


def run_command(command: list[str]) -> float:
    """Run ``command``; return the peak resident memory of its process in GiB. Exits on failure."""
    print("$", shlex.join(command), flush=True)
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"compare: {command[0]} failed with status {code}")
    return usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


@cache
def supports(command: str, option: str) -> bool:
    """Whether ``command --help`` lists ``option`` (e.g. --no-report, absent from older versions)."""
    helped = subprocess.run([command, "--help"], capture_output=True, text=True)
    return option in helped.stdout


def _epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    try:
        with (run_dir / "metrics.csv").open(newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def finished_record(study: Study, model: str, seed: int) -> dict | None:
    """The run's compare.json when it finished with the study's present settings, else None."""
    record = _read_json(study.runs / f"{model}-s{seed}-{study.epochs}ep" / "compare.json")
    return record if record and record.get("settings") == settings_of(study, model, seed) else None


def validation_record(run_dir: Path) -> dict:
    """What a screen keeps of a finished run: its epochs from metrics.csv (training loss and
    validation metrics per epoch) and the best validation balanced accuracy with its epoch."""
    rows = _epoch_rows(run_dir)
    curve = {
        key: [float(row[key]) if row[key] not in ("", "nan") else math.nan for row in rows]
        for key in ("train_loss", "val_loss", "val_balanced_accuracy", "val_auroc")
    }
    scores = curve["val_balanced_accuracy"]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first best epoch
    seconds = [float(row["seconds"]) for row in rows]
    summary = _read_json(run_dir / "dataset_summary.json") or {}
    return {
        "curve": curve,
        "classes": len(summary.get("per_class") or {}) or None,
        "best_val_balanced_accuracy": scores[best],
        "best_epoch": best + 1,
        "epochs": len(rows),
        "epoch_seconds": seconds,
        "seconds_per_epoch": statistics.median(seconds),
    }


def parameter_count(state) -> int:
    """The trainable parameters of a checkpoint's model (its state dict also holds buffers, such
    as BatchNorm's running statistics, which are not parameters)."""
    return sum(p.numel() for p in state.build_model().parameters())


def run_one(study: Study, model: str, seed: int) -> dict:
    """Train (or resume, or reuse) and evaluate one run; returns and writes its compare.json."""
    from volumetric.checkpoint import load_checkpoint

    run_dir = study.runs / f"{model}-s{seed}-{study.epochs}ep"
    settings = settings_of(study, model, seed)
    record = finished_record(study, model, seed)
    if record is not None:
        return record  # finished earlier with the same settings
    started = _read_json(run_dir / "compare_settings.json")
    if started is not None and started != settings["train"]:
        raise SystemExit(
            f"compare: {run_dir} was trained with other settings than these; remove it or give "
            "another --runs folder"
        )
    if started is None and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"compare: {run_dir} holds files compare.py did not start; remove it")

    finished = (run_dir / "best.pt").exists() and len(_epoch_rows(run_dir)) >= study.epochs
    if not finished:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "compare_settings.json", settings["train"])
        train = [
            "volumetric-train",
            str(study.training_folder),
            "--config",
            str(study.config),
            "--output-dir",
            str(run_dir),
            "--no-progress",
            f"--train.epochs={study.epochs}",
            f"--train.seed={seed}",
            *settings["train"]["overrides"],
        ]
        train += ["--no-report"] if supports("volumetric-train", "--no-report") else []
        train += ["--resume"] if (run_dir / "last.pt").exists() else []
        peak_gib: float | None = run_command(train)
        _write_json(run_dir / "compare_train.json", {"peak_memory_gib": peak_gib})
    else:  # trained earlier (then stopped before its evaluation, or the test set changed)
        peak_gib = (_read_json(run_dir / "compare_train.json") or {}).get("peak_memory_gib")
    if study.validation_only:
        record = {"settings": settings, **validation_record(run_dir), "peak_memory_gib": peak_gib}
        _write_json(run_dir / "compare.json", record)
        return record
    evaluate = [
        "volumetric-evaluate",
        str(run_dir / "best.pt"),
        str(study.data / "test"),
        "--output-dir",
        str(run_dir / "test"),
        "--no-progress",
    ]
    evaluate += ["--no-report"] if supports("volumetric-evaluate", "--no-report") else []
    run_command(evaluate)

    state = load_checkpoint(run_dir / "best.pt")
    seconds = [float(row["seconds"]) for row in _epoch_rows(run_dir)]
    record = {
        "settings": settings,
        "test": json.loads((run_dir / "test" / "metrics.json").read_text()),
        "predictions": _shown(run_dir / "test" / "predictions.csv"),
        "epoch_seconds": seconds,
        "seconds_per_epoch": statistics.median(seconds),
        "epochs": len(seconds),
        "best_epoch": state.epoch,
        "parameters": parameter_count(state),
        # of the last training process (a resumed run: of its resumption); None when not measured
        "peak_memory_gib": peak_gib,
    }
    _write_json(run_dir / "compare.json", record)
    return record


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for the study, so that two compare.py never train at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"compare: another compare.py is running ({folder / '.lock'}); one at a time"
            ) from None
        yield


# -------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _paired_section(study: Study) -> list[str]:
    a_name, b_name = study.pair
    seeds = [
        s
        for s in range(study.seeds)
        if (a_name, s) in study.records and (b_name, s) in study.records
    ]
    if not seeds:
        return []
    tables = {
        name: [read_correct(ROOT / study.records[name, s]["predictions"]) for s in seeds]
        for name in study.pair
    }
    a, b = match_scans(tables[a_name], tables[b_name])  # (S, N) each
    n = a.shape[1]
    la, lb = study.pair_labels
    lines = [
        "",
        f"### {la[0].upper() + la[1:]} minus {lb}, scan by scan",
        "",
        f"| seed | {la} accuracy | {lb} accuracy | difference | 95% interval | only {la} right "
        f"| only {lb} right | McNemar p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, seed in enumerate(seeds):
        result = paired_bootstrap(a[i], b[i], resamples=study.resamples)
        only_a, only_b = discordant(a[i], b[i])
        lines.append(
            f"| {seed} | {a[i].mean():.3f} | {b[i].mean():.3f} | {100 * result['difference']:+.1f} | "
            f"{100 * result['low']:+.1f} to {100 * result['high']:+.1f} | {only_a} | {only_b} | "
            f"{mcnemar_exact(only_a, only_b):.3g} |"
        )
    pooled = paired_bootstrap(a, b, resamples=study.resamples)
    if len(seeds) > 1:
        only = [discordant(a[i], b[i]) for i in range(len(seeds))]
        lines.append(
            f"| pooled ({', '.join(map(str, seeds))}) | {a.mean():.3f} | {b.mean():.3f} | "
            f"{100 * pooled['difference']:+.1f} | {100 * pooled['low']:+.1f} to "
            f"{100 * pooled['high']:+.1f} | {sum(o[0] for o in only)} | {sum(o[1] for o in only)} | – |"
        )
    lines += [
        "",
        f"Difference: {la} minus {lb} test accuracy in points (one scan is {100 / n:.2g} "
        f"points), the same {n} test scans, runs paired by seed. Interval: percentile bootstrap over "
        f"the scans ({study.resamples} resamples, seed {BOOTSTRAP_SEED}; pooled: each scan's "
        "difference averaged over the seed pairs, then scans resampled). McNemar: exact two-sided "
        "test on the scans only one of the pair got right.",
        "",
        verdict_sentence(pooled, names=study.pair_labels),
    ]
    return lines


def report(study: Study) -> str:
    """The task's Markdown section from the runs finished so far (``study.records``)."""
    import torch

    from volumetric.bench.report import machine_description

    info = TASKS[study.task]
    plan = study.plan()
    done = [run for run in plan if run in study.records]
    data_args = _data_args(study.data) or {}
    n_test = next(iter(study.records.values()))["test"]["num_scans"] if study.records else None
    seeds_text = f"{study.seeds} seed{'s' if study.seeds > 1 else ''}"
    epochs_text = f"{study.epochs} epoch{'s' if study.epochs > 1 else ''}"
    lines = [
        f"## {info['title']}: {epochs_text}, {seeds_text}",
        "",
        f"Produced by `{study.command}` on {machine_description('cuda' if torch.cuda.is_available() else 'cpu')}, "
        f"{time.strftime('%Y-%m-%d')}.",
    ]
    if len(done) < len(plan):
        pending = ", ".join(f"{m} seed {s}" for m, s in plan if (m, s) not in study.records)
        lines += [
            "",
            f"**Incomplete:** {len(done)} of {len(plan)} runs finished; pending: {pending}.",
        ]
    overrides = (
        f"; overrides {', '.join(f'`{o}`' for o in study.overrides)}" if study.overrides else ""
    )
    train_count = f"{data_args['n_train']} " if "n_train" in data_args else ""
    lines += [
        "",
        f"Data: `{_shown(study.data)}` (`scripts/make_demo_data.py --task {study.task}`), brain MRI "
        f"at 3 mm, {info['what']}. Training on the {train_count}scans of `train/` (a stratified 20% "
        "held out for validation, drawn with the run's seed; best checkpoint by validation balanced "
        f"accuracy), metrics on the {n_test or 'held-out'} `test/` scans, never seen in training. "
        f"Same preprocessing, augmentation, optimiser and budget of {epochs_text} for every "
        f"model (`{_shown(study.config)}`{overrides}); only the model and `train.seed` change.",
        "",
        "| model | seeds | parameters | test accuracy | balanced accuracy | AUROC | time / epoch "
        "| peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in study.models:
        records = [study.records[m, s] for m, s in plan if m == model and (m, s) in study.records]
        if not records:
            continue
        tests = [r["test"] for r in records]
        seconds = [t for r in records for t in r["epoch_seconds"]]
        peaks = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
        lines.append(
            f"| {study.describe(model)} | {len(records)} | {records[0]['parameters'] / 1e6:.2f} M | "
            f"{format_mean_sd([t['accuracy'] for t in tests])} | "
            f"{format_mean_sd([t['balanced_accuracy'] for t in tests])} | "
            f"{format_mean_sd([t['auroc'] for t in tests])} | "
            f"{statistics.median(seconds):.1f} s | {f'{max(peaks):.2f} GiB' if peaks else 'n/a'} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over the seeds (one seed: its value alone). Time per "
        "epoch: the median over all epochs of the model's runs, training plus validation, one "
        "process; peak memory: the largest resident-set high-water mark of its training processes.",
    ]
    lines += _paired_section(study)
    lines += [
        "",
        "<details><summary>Every run</summary>",
        "",
        "| model | seed | test accuracy | balanced accuracy | AUROC | best epoch | time / epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, seed in done:
        r = study.records[model, seed]
        t = r["test"]
        lines.append(
            f"| {model} | {seed} | {_fmt(t.get('accuracy'))} | {_fmt(t.get('balanced_accuracy'))} | "
            f"{_fmt(t.get('auroc'))} | {r['best_epoch']} / {r['epochs']} | "
            f"{r['seconds_per_epoch']:.1f} s |"
        )
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _at(values: list[float], epoch: int) -> float:
    """The value at a 1-based epoch, NaN when the run is shorter."""
    return values[epoch - 1] if len(values) >= epoch else math.nan


def screen_out(study: Study, records: list[dict]) -> list[str]:
    """Why a screened model is out, one reason per rule broken on some seed: its training loss
    above the limit at epoch 10, or its best validation balanced accuracy below halfway from
    chance (1 / classes) to 1."""
    reasons = []
    if any(_at(r["curve"]["train_loss"], 10) > study.loss_limit for r in records):
        reasons.append(f"out (training loss above {study.loss_limit} at epoch 10)")
    floors = [(1 + 1 / r["classes"]) / 2 for r in records if r.get("classes")]
    scores = [r["best_val_balanced_accuracy"] for r in records if r.get("classes")]
    if any(score < floor for score, floor in zip(scores, floors)):
        reasons.append(f"out (validation balanced accuracy below {min(floors):.3f})")
    return reasons


def screen_report(study: Study) -> str:
    """The section of a ``--validation-only`` screen: per model, the best validation balanced
    accuracy over seeds (mean ± sd), the training loss at epochs 1, 10 and the last, and whether
    the model is out (`screen_out`)."""
    import torch

    from volumetric.bench.report import machine_description

    plan = study.plan()
    title = study.section or f"{TASKS[study.task]['title']} screen"
    lines = [
        f"## {title}: {study.epochs} epochs, validation split",
        "",
        f"Produced by `{study.command}` on "
        f"{machine_description('cuda' if torch.cuda.is_available() else 'cpu')}, "
        f"{time.strftime('%Y-%m-%d')}. Training on `{_shown(study.training_folder)}` with "
        f"`{_shown(study.config)}`{''.join(f', `{o}`' for o in study.overrides)}; a stratified 20% "
        "held out for validation, drawn with the run's seed. No test scan was used.",
    ]
    pending = [f"{m} seed {s}" for m, s in plan if (m, s) not in study.records]
    if pending:
        lines += ["", f"**Incomplete:** pending: {', '.join(pending)}."]
    last = study.epochs
    lines += [
        "",
        f"| model | seeds | best validation balanced accuracy | validation loss at epoch {last} "
        f"| training loss at epochs 1 / 10 / {last} (per seed) | out |",
        "|---|---:|---:|---:|---|---|",
    ]
    for model in study.models:
        records = [study.records[m, s] for m, s in plan if m == model and (m, s) in study.records]
        if not records:
            continue
        losses = [r["curve"]["train_loss"] for r in records]
        shown = "; ".join(
            " / ".join(_fmt(_at(loss, e), ".2f") for e in (1, 10, last)) for loss in losses
        )
        lines.append(
            f"| {study.describe(model)} | {len(records)} | "
            f"{format_mean_sd([r['best_val_balanced_accuracy'] for r in records])} | "
            f"{format_mean_sd([_at(r['curve']['val_loss'], last) for r in records])} | {shown} | "
            f"{'; '.join(screen_out(study, records)) or '–'} |"
        )
    lines += [
        "",
        "Best validation balanced accuracy: the highest of the run's epochs (what picks best.pt), "
        "mean ± sample standard deviation over the seeds. Out: a training loss above the limit at "
        "epoch 10 (does not learn), or a best validation balanced accuracy below halfway from "
        "chance to 1 (does not generalize; a model that memorizes passes the first rule), on "
        "some seed.",
    ]
    return "\n".join(lines) + "\n"


def write_report(study: Study) -> str:
    from volumetric.bench.report import write_markdown

    text = screen_report(study) if study.validation_only else report(study)
    marker = study.section or f"compare {study.task} {study.epochs} epochs"
    write_markdown(study.output, text, marker, title=TITLE)
    return text


# ---------------------------------------------------------------------------------------- main


def prepare_data(task: str, data: Path) -> None:
    """Build the task's demo set at its default place (rebuilt only when stale), or at ``data``
    when that does not exist yet; an existing other folder is used as it is."""
    if data.resolve() == TASKS[task]["data"].resolve() or not data.exists():
        script = ROOT / "scripts" / "make_demo_data.py"
        subprocess.run([sys.executable, str(script), str(data), "--task", task], check=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="lesion")
    parser.add_argument("--data", type=Path, help="the data set (default: the task's demo set)")
    parser.add_argument("--config", type=Path, help="default: the task's demo config")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per model (3)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument(
        "--single-seed-models",
        nargs="*",
        default=SINGLE_SEED,
        help=f"trained with seed 0 only (default: {' '.join(SINGLE_SEED)})",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. train.batch_size=4 (repeatable)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the runs already finished with these settings",
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME KEY=VALUE",
        help="define a model: a name, then config overrides (repeatable), e.g. "
        "--variant ls model.layer_scale=0.1",
    )
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"), help="paired: A minus B")
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="a screen: train, read the validation metrics, never evaluate on the test scans",
    )
    parser.add_argument("--train-data", type=Path, help="default: DATA/train")
    parser.add_argument("--section", help="the report section's name (its marker in the output)")
    parser.add_argument("--loss-limit", type=float, default=1.3)
    parser.add_argument("--bootstrap-resamples", type=int, default=BOOTSTRAP_RESAMPLES)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or args.bootstrap_resamples < 1:
        parser.error("--seeds, --epochs and --bootstrap-resamples must be at least 1")
    if any("=" not in o or o.startswith("-") for o in args.override):
        parser.error("--override takes KEY=VALUE, e.g. --override train.batch_size=4")
    args.variants = {}
    for name, *overrides in args.variant:
        if name in MODELS or name in args.variants or not overrides:
            parser.error(f"--variant {name}: a new name, then at least one KEY=VALUE")
        if any("=" not in o or o.startswith("-") for o in overrides):
            parser.error(f"--variant {name}: overrides are KEY=VALUE, e.g. model.layer_scale=0.1")
        args.variants[name] = overrides
    known = [*MODELS, *args.variants]
    for name in [*args.models, *args.single_seed_models, *(args.pair or [])]:
        if name not in known:
            parser.error(f"model {name!r} is not one of {known} (define it with --variant)")
    args.data = args.data or TASKS[args.task]["data"]
    args.config = args.config or TASKS[args.task]["config"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    study = Study(
        task=args.task,
        data=args.data,
        config=args.config,
        runs=args.runs / args.task,
        epochs=args.epochs,
        seeds=args.seeds,
        models=args.models,
        single_seed=args.single_seed_models,
        overrides=[f"--{o}" for o in args.override],
        output=args.output,
        command=shlex.join(["./scripts/compare.sh", *given]),
        resamples=args.bootstrap_resamples,
        variants=args.variants,
        pair=tuple(args.pair) if args.pair else PAIR,
        validation_only=args.validation_only,
        train_data=args.train_data,
        section=args.section,
        loss_limit=args.loss_limit,
    )
    with exclusive(args.runs):
        if not args.report_only:
            prepare_data(args.task, args.data)
        for model, seed in study.plan():
            if args.report_only:  # what finished, e.g. in runs trained elsewhere and copied here
                record = finished_record(study, model, seed)
                if record is not None:
                    study.records[model, seed] = record
                continue
            study.records[model, seed] = run_one(study, model, seed)
            write_report(study)  # after every run: an interrupted study loses nothing
        text = write_report(study)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

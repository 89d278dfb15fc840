#!/usr/bin/env python
"""Accuracy against cost by token resolution: the table and plot of docs/results.md.

    python scripts/resolution_table.py ROWS.yaml [--time | --retime] [--timing-epochs 3]
        [--output docs/results.md] [--plot docs/resolution.png]

ROWS.yaml names the rows, each a model (overrides of the task's demo config) and, per task, the
folders of its finished `scripts/compare.py` runs:

    runs_root: /path/to/runs          # run folders below, as compare.py writes them
    rows:
      - label: seq-norm, patch 8
        overrides: [model.layer_scale=0.1]
        runs: {lesion: table/lesion/default_p8-s*-30ep, regions: table/regions/default_p8-s*-30ep}

Per row and task: test accuracy and AUROC over the runs' seeds (mean ± sample sd, from each
run's compare.json: the 1,000 test scans); per row: parameters and forward GFLOPs of one
64×80×64 scan (counted by torch's FlopCounterMode; softmax attention is counted through its
explicit N×N form, since SDPA's CPU kernel is not counted) and, with ``--time``, the training
time per epoch (training plus validation on the lesion task's 400 training scans, the median of
epochs 2 to ``--timing-epochs``, or to the row's own ``timing_epochs``) and the peak resident
memory of that run, measured here one process at a time. Timings are kept in ``timings.json``
beside ROWS.yaml: ``--time`` measures the rows that have none there, ``--retime`` every row, and
without either the kept ones are shown. A row timed over its second epoch alone
(``timing_epochs: 2``, for a model whose epochs take many minutes) is marked "†"; a row timed but
not trained (no runs) shows in the plot as a dotted line at its time. A row with ``time: runs``
is not timed: its
time per epoch is the median epoch of its own training runs (every epoch of every seed and task,
each run one process at a time on this machine; both tasks train on 400 scans of one shape) and
its peak memory their largest, marked "‡" in the table. The plot puts test accuracy (mean over
seeds and both tasks shown apart) against training time per epoch.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "lesion": ROOT / "configs" / "demo.yaml",
    "regions": ROOT / "configs" / "demo_regions.yaml",
}
TIMING_DATA = ROOT / "data" / "demo" / "train"
SCAN_SHAPE = (64, 80, 64)
SECTION = "resolution"


def model_of(overrides: list[str]):
    """The lesion task's model with ``overrides``: (torch module, config)."""
    from volumetric.config import load_config
    from volumetric.models.registry import build_model, model_arguments

    config = load_config(CONFIG["lesion"], [f"--{o}" for o in overrides])
    args = model_arguments(config.model.arch, asdict(config.model), 2)
    return build_model(config.model.arch, args).eval(), config


def cost(overrides: list[str]) -> dict[str, float]:
    """Parameters (millions) and forward GFLOPs on one scan of the demo's shape."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from volumetric.layers import attention
    from volumetric.layers.attention_functional import softmax_attention_explicit

    model, _ = model_of(overrides)
    volume = torch.zeros(1, 1, *SCAN_SHAPE)
    # SDPA's CPU kernel escapes the counter: count softmax attention in its explicit form
    with mock.patch.object(attention, "softmax_attention", softmax_attention_explicit):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(volume)
    return {
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
    }


def timing(overrides: list[str], epochs: int) -> dict[str, float]:
    """Train ``epochs`` epochs on the lesion training set in a process of its own: the median
    epoch time over epochs 2.. (the first fills the cache) and the process's peak memory."""
    with tempfile.TemporaryDirectory(prefix="resolution-") as folder:
        command = [
            "volumetric-train",
            str(TIMING_DATA),
            "--config",
            str(CONFIG["lesion"]),
            "--output-dir",
            str(Path(folder) / "run"),
            "--no-progress",
            "--no-report",
            f"--train.epochs={epochs}",
            *[f"--{o}" for o in overrides],
        ]
        print("$", shlex.join(command), flush=True)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"resolution_table: {shlex.join(command)} failed")
        rows = (Path(folder) / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    seconds = [float(r.split(",")[header.index("seconds")]) for r in rows[1:]]
    return {
        "epoch_s": statistics.median(seconds[1:]),
        "peak_gib": usage.ru_maxrss / 2**20,
        "epochs": len(seconds) - 1,  # how many epochs the median is of
    }


def timing_of_runs(patterns: list[str]) -> dict[str, float] | None:
    """The median epoch time and the largest peak memory of the finished runs matching
    ``patterns`` (from their compare.json records); None when none has finished."""
    seconds: list[float] = []
    peaks: list[float] = []
    for pattern in patterns:
        for path in sorted(glob.glob(str(Path(pattern) / "compare.json"))):
            record = json.loads(Path(path).read_text())
            seconds += record["epoch_seconds"]
            if record.get("peak_memory_gib") is not None:  # None where it was not measured
                peaks.append(record["peak_memory_gib"])
    if not seconds:
        return None
    peak = max(peaks) if peaks else math.nan
    return {"epoch_s": statistics.median(seconds), "peak_gib": peak, "from_runs": True}


def accuracy(pattern: str) -> dict[str, list[float]]:
    """Test accuracy and AUROC of every finished run matching ``pattern``."""
    found: dict[str, list[float]] = {"accuracy": [], "auroc": []}
    for path in sorted(glob.glob(str(Path(pattern) / "compare.json"))):
        test = json.loads(Path(path).read_text())["test"]
        found["accuracy"].append(test["accuracy"])
        found["auroc"].append(test["auroc"])
    return found


def mean_sd(values: list[float]) -> str:
    from volumetric.evaluation.comparison import format_mean_sd

    return format_mean_sd(values) if values else "–"


def section(spec: dict, rows: list[dict], device: str, command: str) -> str:
    lines = [
        "## Accuracy against cost, by token resolution",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}. Accuracy and AUROC: the 1,000 "
        "test scans of each demo task, mean ± sample sd over the seeds (n); time per epoch and "
        f"peak memory: {device}, one process at a time, training plus validation on the lesion "
        "task's 400 training scans (median of epochs 2 and later); GFLOPs: one forward pass on a "
        f"{'×'.join(map(str, SCAN_SHAPE))} scan.",
        "",
        "| model | tokens / scan | parameters | GFLOPs / scan | time / epoch | peak memory "
        "| lesion accuracy (n) | lesion AUROC | regions accuracy (n) | regions AUROC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["label"],
            row["tokens"],
            f"{row['parameters_m']:.2f} M",
            f"{row['gflops']:.2f}",
        ]
        timed = row.get("timing")
        mark = timing_mark(timed)
        cells += (
            [
                f"{timed['epoch_s']:.1f} s{mark}",
                f"{timed['peak_gib']:.2f} GiB{mark}" if math.isfinite(timed["peak_gib"]) else "–",
            ]
            if timed
            else ["–", "–"]
        )
        for task in ("lesion", "regions"):
            found = row["results"].get(task) or {"accuracy": [], "auroc": []}
            n = len(found["accuracy"])
            cells += [
                f"{mean_sd(found['accuracy'])} ({n})" if n else "–",
                mean_sd(found["auroc"]),
            ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    marks = {timing_mark(row.get("timing")) for row in rows}
    if " ‡" in marks:
        lines += [
            "",
            "‡ not in the timing pass: the median epoch of the row's own training runs "
            "(30 epochs a seed, both tasks, 400 scans of the same shape each, one process at a "
            "time on the same machine) and their largest peak memory.",
        ]
    if " †" in marks:
        lines += [
            "",
            "† timed over its second epoch alone (the first fills the cache), its epochs being "
            "too long on this machine for more.",
        ]
    lines += ["", f"![accuracy against training time per epoch]({spec['plot_name']})", ""]
    return "\n".join(lines)


def timing_mark(timed: dict | None) -> str:
    """The table's mark for how a row was timed: ‡ from its own runs, † over one epoch."""
    if not timed:
        return ""
    if timed.get("from_runs"):
        return " ‡"
    return " †" if timed.get("epochs") == 1 else ""


def trained(row: dict) -> bool:
    """Whether the row has test accuracy on some task (a row may be timed only)."""
    return any(found and found["accuracy"] for found in row["results"].values())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from volumetric.atomic_files import atomic_path

    figure, axes = plt.subplots(figsize=(7, 4.5))
    # a colour per row and a marker per task, named in the legend: labels written beside the
    # points overlapped where two rows train at the same speed
    palette = plt.get_cmap("tab10")  # ten colours, called by index
    for index, row in enumerate(rows):
        timed = row.get("timing")
        for task, marker in (("lesion", "o"), ("regions", "s")):
            found = row["results"].get(task)
            if not found or not found["accuracy"] or not timed:
                continue
            mean = statistics.fmean(found["accuracy"])
            sd = statistics.stdev(found["accuracy"]) if len(found["accuracy"]) > 1 else 0.0
            axes.errorbar(
                timed["epoch_s"],
                mean,
                yerr=sd,
                marker=marker,
                color=palette(index % 10),
                capsize=3,
                ls="none",
            )
    handles = [
        Line2D([], [], color=palette(i % 10), marker="D", ls="none", label=row["label"])
        for i, row in enumerate(rows)
        if row.get("timing") and trained(row)
    ]
    for index, row in enumerate(rows):  # timed but not trained: where its cost lies
        timed = row.get("timing")
        if timed and not trained(row):
            axes.axvline(timed["epoch_s"], color=palette(index % 10), ls=":")
            label = f"{row['label']} (timed, not trained)"
            handles.append(Line2D([], [], color=palette(index % 10), ls=":", label=label))
    handles += [
        Line2D([], [], color="grey", marker=m, ls="none", label=f"{task} task")
        for task, m in (("lesion", "o"), ("regions", "s"))
    ]
    axes.legend(handles=handles, fontsize=7, loc="lower right")
    axes.set_xscale("log")
    # plain seconds as tick labels (a log axis over one decade would label 2×10¹, 3×10¹)
    low, high = axes.get_xlim()
    axes.set_xticks([t for t in (5, 10, 15, 20, 30, 50, 100, 200, 500) if low <= t <= high])
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("training time per epoch (s, log scale)")
    axes.set_ylabel("test accuracy (1,000 scans)")
    low, high = axes.get_ylim()
    axes.set_ylim(low, min(high, 1.02))  # an sd's bar is cut just above 1: no accuracy passes it
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def table_row(row: dict, root: Path, timed: dict[str, float] | None) -> dict:
    """One row of the table: the model's tokens and cost, its timing (``timed`` from a timing
    pass, or its own runs' for ``time: runs``) and its test results per task."""
    overrides = list(row.get("overrides") or [])
    _, config = model_of(overrides)
    patch = config.model.patch_size
    patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    tokens = 1
    for side, p in zip(SCAN_SHAPE, patch):
        tokens *= side // p
    runs = {task: str(root / pattern) for task, pattern in row["runs"].items()}
    return {
        "label": row["label"],
        "tokens": tokens if config.model.arch == "vit3d" else "–",
        **cost(overrides),
        "timing": timing_of_runs(list(runs.values())) if row.get("time") == "runs" else timed,
        "results": {task: accuracy(pattern) for task, pattern in runs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path)
    timing_choice = parser.add_mutually_exclusive_group()
    timing_choice.add_argument(
        "--time", action="store_true", help="measure time and memory of rows not yet timed"
    )
    timing_choice.add_argument(
        "--retime", action="store_true", help="measure time and memory of every row again"
    )
    parser.add_argument("--timing-epochs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "resolution.png")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(args.rows.read_text())
    spec["plot_name"] = os.path.relpath(args.plot, args.output.parent)
    timings_path = args.rows.with_name("timings.json")
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    root = Path(spec.get("runs_root", "."))
    rows = []
    for row in spec["rows"]:
        overrides = list(row.get("overrides") or [])
        key = " ".join(overrides)
        wanted = args.retime or (args.time and key not in timings)
        if wanted and row.get("time", True) not in (False, "runs"):
            timings[key] = timing(overrides, row.get("timing_epochs", args.timing_epochs))
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        rows.append(table_row(row, root, timings.get(key)))
    from volumetric.bench.report import machine_description, write_markdown

    command = shlex.join(["python", "scripts/resolution_table.py", *(argv or sys.argv[1:])])
    text = section(spec, rows, machine_description("cpu"), command)
    write_markdown(args.output, text, SECTION, title="# Accuracy")
    plot(rows, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

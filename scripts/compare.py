#!/usr/bin/env python
"""Accuracy comparison on the demo data: seq-norm ViT vs its softmax variant vs MONAI's DenseNet121.

    python scripts/compare.py [--data data/demo] [--runs runs/compare] [--epochs 30]
                              [--models seqnorm softmax densenet121] [--output docs/results.md]

Every model gets the same data, preprocessing, augmentation, optimiser and epoch budget
(configs/demo.yaml; only the model changes), is trained with volumetric-train, and its best
checkpoint is evaluated with volumetric-evaluate on the held-out test split. Each training runs in
its own process so that its peak memory (resident-set high-water mark) is its own. Finished runs are
reused (runs/compare/<model>-<epochs>ep), interrupted ones resumed, so the script can be run again at
no cost. Each budget and model set is its own section of the Markdown output, replaced on a re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from volumetric.bench.report import write_markdown

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "seqnorm": ["--model.attention=seqnorm"],
    "softmax": ["--model.attention=softmax"],
    "densenet121": ["--model.arch=densenet121"],
}
DESCRIPTION = {
    "seqnorm": "seq-norm ViT (this method)",
    "softmax": "softmax ViT (same model, SDPA attention)",
    "densenet121": "MONAI DenseNet121 (3D CNN)",
}


def run(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return (wall seconds, peak resident memory in GiB). Raises on failure."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"compare: {command[0]} failed with status {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def train_and_evaluate(name: str, args: argparse.Namespace) -> dict:
    run_dir = args.runs / f"{name}-{args.epochs}ep"
    record = run_dir / "compare.json"
    settings = {"epochs": args.epochs, "config": str(args.config), "overrides": MODELS[name]}
    if record.exists() and json.loads(record.read_text()).get("settings") == settings:
        return json.loads(record.read_text())  # finished earlier with the same settings
    train = [
        "volumetric-train",
        str(args.data / "train"),
        "--config",
        str(args.config),
        "--output-dir",
        str(run_dir),
        "--no-progress",
        f"--train.epochs={args.epochs}",
        *MODELS[name],
    ]
    if (run_dir / "last.pt").exists():
        train.append("--resume")
    _, peak_gib = run(train)
    run(
        [
            "volumetric-evaluate",
            str(run_dir / "best.pt"),
            str(args.data / "test"),
            "--output-dir",
            str(run_dir / "test"),
            "--no-progress",
        ]
    )
    with (run_dir / "metrics.csv").open(newline="") as handle:
        epochs = list(csv.DictReader(handle))
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    result = {
        "settings": settings,
        "test": json.loads((run_dir / "test" / "metrics.json").read_text()),
        "seconds_per_epoch": statistics.median(float(row["seconds"]) for row in epochs),
        "epochs": len(epochs),
        "best_epoch": state["best_epoch"],
        "parameters": sum(v.numel() for k, v in state["model"].items() if v.is_floating_point()),
        "peak_memory_gib": peak_gib,  # of the last training process (a resumed run: of its resumption)
    }
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (the report is committed)."""
    return path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


def report(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"## {args.epochs}-epoch budget",
        "",
        f"Produced by `{command}` on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}), "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Data: the demo set (`scripts/make_demo_data.py`, `{_shown(args.data)}`): brain MRI at 3 mm, lesion vs no lesion; "
        "training on `train/` (80/20 split for validation, best checkpoint by validation balanced accuracy), "
        "metrics on the held-out `test/` scans, never seen in training. Same preprocessing, augmentation, "
        f"optimiser and budget of {args.epochs} epochs for every model (`configs/demo.yaml`, only the model changes).",
        "",
        "| model | parameters | test accuracy | balanced accuracy | AUROC | best epoch | time / epoch | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        t = r["test"]
        lines.append(
            f"| {DESCRIPTION[name]} | {r['parameters'] / 1e6:.2f} M | {fmt(t.get('accuracy'))} | "
            f"{fmt(t.get('balanced_accuracy'))} | {fmt(t.get('auroc'))} | {r['best_epoch']} / {r['epochs']} | "
            f"{r['seconds_per_epoch']:.1f} s | {r['peak_memory_gib']:.2f} GiB |"
        )
    if "seqnorm" in results and "softmax" in results:
        gap = results["seqnorm"]["test"]["accuracy"] - results["softmax"]["test"]["accuracy"]
        n = results["seqnorm"]["test"]["num_scans"]
        lines += [
            "",
            f"Seq-norm minus softmax test accuracy: {100 * gap:+.1f} points on {n} test scans "
            f"(one scan is {100 / n:.1f} points).",
        ]
    lines += [
        "",
        "Time per epoch is the median over epochs of training plus validation, one process, "
        "float32 on this machine; peak memory is the training process's resident-set high-water mark.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args()
    command = "./scripts/compare.sh" + "".join(f" {a}" for a in sys.argv[1:])
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(args.data)], check=True
    )
    results = {name: train_and_evaluate(name, args) for name in args.models}
    text = report(results, args, command)
    write_markdown(
        args.output,
        text,
        f"compare {args.epochs} epochs {' '.join(args.models)}",
        title="# Accuracy: seq-norm vs softmax attention vs MONAI DenseNet121",
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

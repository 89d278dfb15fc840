#!/usr/bin/env python
"""Cross-validation, the fold ensemble and calibration on a demo task: the section of
docs/results.md that shows the evaluation protocol at work.

    python scripts/folds_study.py [--data data/demo] [--config configs/demo.yaml] [--folds 3]
        [--runs runs/folds_study] [--override KEY=VALUE ...] [--output docs/results.md]

1. ``volumetric-train DATA/train --folds K`` with temperature scaling and the lesion as the
   positive class (resumable: run again to finish);
2. each fold's best.pt on the held-out test scans, with its temperature and without it (the same
   weights: the calibration error before and after temperature scaling);
3. the K folds as one ensemble (the run folder) on the same test scans;
4. a Markdown section: per fold and for the ensemble, test accuracy, balanced accuracy, AUROC,
   ECE and Brier score (before / after temperature), and the cross-validation summary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "folds"


def run(command: list[str]) -> None:
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"folds_study: {command[0]} failed")


def evaluate(model: Path, test: Path, out: Path) -> dict:
    """metrics.json of ``model`` on ``test`` (reused when already there)."""
    if not (out / "metrics.json").exists():
        command = ["volumetric-evaluate", str(model), str(test), "--output-dir", str(out)]
        run([*command, "--no-progress", "--no-report"])
    return json.loads((out / "metrics.json").read_text())


def uncalibrated_copy(best: Path, copy: Path) -> Path:
    """``best`` with its temperature removed (the weights and threshold as they are)."""
    from volumetric.checkpoint import load_checkpoint, write_decision

    if not copy.exists():
        copy.write_bytes(best.read_bytes())
        write_decision(copy, {**(load_checkpoint(best).decision or {}), "temperature": None})
    return copy


def row(name: str, calibrated: dict, plain: dict | None) -> str:
    def f(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    before = f"{f(plain['ece'])} / " if plain else ""
    brier = f"{f(plain['brier'])} / " if plain else ""
    t = calibrated.get("temperature")
    return (
        f"| {name} | {f(calibrated['accuracy'])} | {f(calibrated['balanced_accuracy'])} | "
        f"{f(calibrated['auroc'])} | {before}{f(calibrated['ece'])} | {brier}{f(calibrated['brier'])} "
        f"| {f(t) if t else '–'} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "folds_study")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    folds_dir = args.runs / "cv"
    train = [
        "volumetric-train",
        str(args.data / "train"),
        "--config",
        str(args.config),
        "--folds",
        str(args.folds),
        "--output-dir",
        str(folds_dir),
        "--no-progress",
        "--no-report",
        "--train.calibrate=true",
        "--train.positive_class=lesion",
        *[f"--{o}" for o in args.override],
    ]
    if not (folds_dir / "folds.json").exists():
        run(train)
    test = args.data / "test"
    lines = []
    for k in range(1, args.folds + 1):
        best = folds_dir / f"fold-{k}" / "best.pt"
        calibrated = evaluate(best, test, args.runs / f"test-fold-{k}")
        plain_model = uncalibrated_copy(best, args.runs / f"fold-{k}-uncalibrated.pt")
        plain = evaluate(plain_model, test, args.runs / f"test-fold-{k}-uncalibrated")
        lines.append(row(f"fold {k} alone", calibrated, plain))
    ensemble = evaluate(folds_dir, test, args.runs / "test-ensemble")
    lines.append(row(f"ensemble of the {args.folds} folds", ensemble, None))
    summary = json.loads((folds_dir / "folds.json").read_text())
    mean_sd = summary["mean_sd"]
    command = shlex.join(["python", "scripts/folds_study.py", *(argv or sys.argv[1:])])
    text = "\n".join(
        [
            f"## Cross-validation, the fold ensemble and calibration ({args.folds} folds)",
            "",
            f"Produced by `{command}`, {time.strftime('%Y-%m-%d')}: `{shlex.join(train)}`, then "
            f"each fold's `best.pt` and the folds folder (their ensemble) on the "
            f"{ensemble['num_scans']} test scans. ECE and Brier: without / with the fold's "
            "temperature (fitted on its validation fold); the ensemble averages the calibrated "
            "members.",
            "",
            "| model (test scans) | accuracy | balanced accuracy | AUROC | ECE | Brier | temperature |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *lines,
            "",
            "Cross-validation (each fold's best.pt on its own validation fold): accuracy "
            f"{mean_sd['accuracy'][0]:.3f} ± {mean_sd['accuracy'][1]:.3f}, AUROC "
            f"{mean_sd['auroc'][0]:.3f} ± {mean_sd['auroc'][1]:.3f}; pooled out-of-fold accuracy "
            f"{summary['out_of_fold']['accuracy']:.3f}, AUROC {summary['out_of_fold']['auroc']:.3f}.",
            "",
        ]
    )
    from volumetric.bench.report import write_markdown

    write_markdown(args.output, text, SECTION, title="# Accuracy")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

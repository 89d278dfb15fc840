#!/usr/bin/env python
"""Label efficiency of masked-volume pretraining on the demo tasks: fine-tuned from one pretrained
encoder against trained from scratch, with the same few labeled scans (docs/results.md,
"Pretraining").

    python scripts/pretrain_study.py [--data data/demo] [--regions-data data/demo_regions]
        [--pool data/demo_pool] [--pool-scans 2000] [--runs runs/pretrain_study]
        [--config configs/demo.yaml] [--override KEY=VALUE ...]
        [--labels 40 100 400] [--seeds 3] [--single-seed-labels 400] [--regions-labels 100]
        [--samples 12000] [--pretrain-epochs 100] [--output docs/results.md]

1. The unlabeled pool: ``--pool-scans`` lesion-task scans made by scripts/make_demo_data.py with
   a seed of its own (``--pool-seed``, not the demo's 0), so that no pool scan is a test scan;
   they share the test scans' template, so any gain measured here is an optimistic one.
2. Pretraining, once: volumetric-pretrain on the pool with the study's config (model, batches,
   optimizer) for ``--pretrain-epochs``.
3. For each number of labels n and seed s: a stratified draw of n scans of the task's training
   folder (a folder of links, the same for both arms), trained with ``train.val_fraction=0`` for
   ceil(samples / n) epochs, i.e. the same optimizer steps in both arms, from scratch and from
   ``--init pretrained.pt``; with so few labels there is no validation pick: the last checkpoint
   is evaluated on the task's 1,000 test scans.

Seeds 0 .. N-1 for each label count but those in ``--single-seed-labels`` (seed 0). Runs are
resumed or reused like compare.py's; each finished run's numbers go to ``study.json`` in its
folder and the section (a table, paired differences with bootstrap intervals over the test scans,
and docs/pretraining.png) is rewritten as each run finishes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from volumetric.evaluation.comparison import (
    format_mean_sd,
    match_scans,
    paired_bootstrap,
    read_correct,
)

ROOT = Path(__file__).resolve().parent.parent
SECTION = "pretraining"
ARMS = ("scratch", "pretrained")


def run(command: list[str]) -> None:
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"pretrain_study: {command[0]} failed")


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def labeled_subset(train: Path, n: int, seed: int, out: Path) -> Path:
    """A folder of links to n scans of ``train`` (class folders kept), drawn per class in
    proportion to the class sizes with a generator seeded by (n, seed); made once."""
    if out.exists():
        return out
    by_class = {
        d.name: sorted(p for p in d.iterdir()) for d in sorted(train.iterdir()) if d.is_dir()
    }
    total = sum(len(v) for v in by_class.values())
    if n > total:
        raise SystemExit(f"pretrain_study: {n} labels asked for, {train} holds {total} scans")
    rng = np.random.default_rng([n, seed])
    partial = out.with_name(out.name + ".partial")
    for name, scans in by_class.items():
        take = round(n * len(scans) / total)
        (partial / name).mkdir(parents=True, exist_ok=True)
        for i in sorted(rng.choice(len(scans), size=take, replace=False)):
            (partial / name / scans[i].name).symlink_to(scans[i].resolve())
    partial.rename(out)
    return out


def pretrain(args: argparse.Namespace) -> Path:
    """The pretraining run on the pool (resumed when interrupted); returns pretrained.pt."""
    folder = args.runs / "pretrain"
    rows = _rows(folder / "metrics.csv")
    if (folder / "pretrained.pt").exists() and len(rows) >= args.pretrain_epochs:
        return folder / "pretrained.pt"
    command = [
        "volumetric-pretrain",
        str(args.pool / "train"),
        "--config",
        str(args.config),
        "--output-dir",
        str(folder),
        "--no-progress",
        f"--pretrain.epochs={args.pretrain_epochs}",
        *args.override,
    ]
    run(command + (["--resume"] if (folder / "last.pt").exists() else []))
    return folder / "pretrained.pt"


def fine_tune(args, task: str, data: Path, n: int, seed: int, arm: str, init: Path) -> dict:
    """Train one arm on one labeled subset and evaluate its last checkpoint; its study.json."""
    folder = args.runs / task / f"{arm}-n{n}-s{seed}"
    record_path = folder / "study.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    subset = labeled_subset(data / "train", n, seed, args.runs / "subsets" / f"{task}-n{n}-s{seed}")
    epochs = math.ceil(args.samples / n)
    if len(_rows(folder / "metrics.csv")) < epochs or not (folder / "last.pt").exists():
        command = [
            "volumetric-train",
            str(subset),
            "--config",
            str(TASK_CONFIG[task](args)),
            "--output-dir",
            str(folder),
            "--no-progress",
            "--no-report",
            f"--train.epochs={epochs}",
            f"--train.seed={seed}",
            "--train.val_fraction=0",
            *args.override,
        ]
        command += ["--init", str(init)] if arm == "pretrained" else []
        run(command + (["--resume"] if (folder / "last.pt").exists() else []))
    test = folder / "test"
    if not (test / "metrics.json").exists():
        run(
            [
                "volumetric-evaluate",
                str(folder / "last.pt"),
                str(data / "test"),
                "--output-dir",
                str(test),
                "--no-progress",
                "--no-report",
            ]
        )
    seconds = [float(row["seconds"]) for row in _rows(folder / "metrics.csv")]
    record = {
        "task": task,
        "labels": n,
        "seed": seed,
        "arm": arm,
        "epochs": epochs,
        "seconds_per_epoch": statistics.median(seconds),
        "test": json.loads((test / "metrics.json").read_text()),
        "predictions": str(test / "predictions.csv"),
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


TASK_CONFIG = {
    "lesion": lambda args: args.config,
    "regions": lambda args: args.regions_config,
}


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(task, labels, seed) in the order they run: the lesion task by label count, then regions."""
    runs = []
    for n in args.labels:
        seeds = 1 if n in args.single_seed_labels else args.seeds
        runs += [("lesion", n, s) for s in range(seeds)]
    runs += [("regions", args.regions_labels, s) for s in range(args.regions_seeds)]
    return runs


# ------------------------------------------------------------------------------------ the report


def _paired(a: list[dict], b: list[dict]) -> dict | None:
    """Pooled paired bootstrap of accuracy, A minus B, A's and B's runs paired in order."""
    if not a or len(a) != len(b):
        return None
    correct_a, correct_b = match_scans(
        [read_correct(Path(r["predictions"])) for r in a],
        [read_correct(Path(r["predictions"])) for r in b],
    )
    return paired_bootstrap(correct_a, correct_b)


def _points(result: dict | None) -> str:
    if result is None:
        return "–"
    return f"{100 * result['difference']:+.1f} [{100 * result['low']:+.1f}, {100 * result['high']:+.1f}]"


def report(args: argparse.Namespace, done: list[dict], pretrain_info: dict) -> str:
    def runs_of(task: str, n: int, arm: str) -> list[dict]:
        return sorted(
            (r for r in done if (r["task"], r["labels"], r["arm"]) == (task, n, arm)),
            key=lambda r: r["seed"],
        )

    lines = [
        "## Pretraining: labeled scans needed, with and without masked-volume pretraining",
        "",
        f"Produced by `python scripts/pretrain_study.py {shlex.join(args.argv)}`. "
        f"{pretrain_info['text']}",
        "",
        "| task | labeled scans | epochs | scratch accuracy | pretrained accuracy | scratch AUROC "
        "| pretrained AUROC | pretrained − scratch, points [95% CI] | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for task, n in sorted(
        {(r["task"], r["labels"]) for r in done}, key=lambda k: (k[0] != "lesion", k[1])
    ):
        scratch, pre = runs_of(task, n, "scratch"), runs_of(task, n, "pretrained")
        paired_seeds = {r["seed"] for r in scratch} & {r["seed"] for r in pre}
        pairs = _paired(
            [r for r in pre if r["seed"] in paired_seeds],
            [r for r in scratch if r["seed"] in paired_seeds],
        )
        epochs = (scratch or pre)[0]["epochs"]
        cells = [
            format_mean_sd([r["test"]["accuracy"] for r in scratch]),
            format_mean_sd([r["test"]["accuracy"] for r in pre]),
            format_mean_sd([r["test"].get("auroc") for r in scratch]),
            format_mean_sd([r["test"].get("auroc") for r in pre]),
        ]
        lines.append(
            f"| {task} | {n} | {epochs} | " + " | ".join(cells) + f" | {_points(pairs)} "
            f"| {len(scratch)} / {len(pre)} |"
        )
    lesion_counts = sorted({r["labels"] for r in done if r["task"] == "lesion"})
    if lesion_counts:
        few, most = lesion_counts[0], lesion_counts[-1]
        mid = [n for n in lesion_counts if n not in (few, most)]
        cross = None
        if mid and runs_of("lesion", most, "scratch"):
            pre = runs_of("lesion", mid[0], "pretrained")
            scratch = runs_of("lesion", most, "scratch")[:1] * len(pre)
            cross = _paired(pre, scratch)
        lines += [
            "",
            "Pretrained − scratch is scan by scan on the same test scans, seed s of one arm paired "
            "with seed s of the other, pooled over the seeds (bootstrap over scans). "
            + (
                f"Pretrained with {mid[0]} labels against scratch with {most} (its seed 0 paired "
                f"with each pretrained seed): {_points(cross)} points."
                if cross
                else ""
            ),
        ]
    lines += [
        "",
        "The unlabeled pool and the test scans are drawn from one template (the same anatomy, other "
        "lesions), so the pool is closer to the test data than an archive would be to a new "
        "task's scans: the gain here is an optimistic estimate of what pretraining buys.",
        "",
        "![Test accuracy against labeled scans](pretraining.png)",
        "",
    ]
    return "\n".join(lines)


def plot(done: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, style in zip(ARMS, ("s--", "o-")):
        rows = [r for r in done if r["task"] == "lesion" and r["arm"] == arm]
        counts = sorted({r["labels"] for r in rows})
        if not counts:
            continue
        accs = [[r["test"]["accuracy"] for r in rows if r["labels"] == n] for n in counts]
        means = [statistics.fmean(a) for a in accs]
        sds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        ax.errorbar(counts, means, yerr=sds, fmt=style, capsize=3, label=arm)
    ax.set(
        xscale="log",
        xlabel="labeled training scans",
        ylabel="test accuracy (1,000 scans)",
        title="lesion task: pretrained vs from scratch",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrain_summary(args: argparse.Namespace, done: list[dict]) -> dict:
    rows = _rows(args.runs / "pretrain" / "metrics.csv")
    if not rows:
        return {"text": ""}
    seconds = statistics.median(float(r["seconds"]) for r in rows)
    pool = sum(1 for _ in (args.pool / "train").rglob("*.nii.gz"))
    held = round(pool * 0.05)  # pretrain.held_out's default
    per_scan = seconds / max(1, pool - held)
    train = [
        r["seconds_per_epoch"] / (r["labels"])
        for r in done
        if r["task"] == "lesion" and r["arm"] == "scratch"
    ]
    train_text = (
        f"; a training epoch took {1 / statistics.median(train):.1f} scans/s on the same machine"
        if train
        else ""
    )
    return {
        "text": f"One encoder pretrained on {pool} unlabeled scans for {len(rows)} epochs "
        f"(median {seconds:.0f} s an epoch, {1 / per_scan:.1f} scans/s{train_text}); the model, "
        f"batches and optimizer of `{args.config}`"
        + (f" with {' '.join(args.override)}" if args.override else "")
        + "; each fine-tuning run from its last checkpoint."
    }


def write_section(args: argparse.Namespace, done: list[dict]) -> None:
    from volumetric.bench.report import write_markdown

    text = report(args, done, pretrain_summary(args, done))
    write_markdown(args.output, text, SECTION, title="# Results")
    plot(done, args.output.parent / "pretraining.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--regions-data", type=Path, default=ROOT / "data" / "demo_regions")
    p.add_argument("--pool", type=Path, default=ROOT / "data" / "demo_pool")
    p.add_argument("--pool-scans", type=int, default=2000)
    p.add_argument("--pool-seed", type=int, default=1)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "pretrain_study")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    p.add_argument("--regions-config", type=Path, default=ROOT / "configs" / "demo_regions.yaml")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--labels", type=int, nargs="+", default=[40, 100, 400])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--single-seed-labels", type=int, nargs="*", default=[400])
    p.add_argument("--regions-labels", type=int, default=100)
    p.add_argument("--regions-seeds", type=int, default=1)
    p.add_argument("--samples", type=int, default=12000, help="scans seen per run (epochs × n)")
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.pool / ".demo_args.json").exists():
        run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_demo_data.py"),
                str(args.pool),
                "--task",
                "lesion",
                "--n-train",
                str(args.pool_scans),
                "--n-test",
                "2",  # the least make_demo_data.py writes; the pool's test folder is not used
                "--seed",
                str(args.pool_seed),
            ]
        )
    for task, data in (("lesion", args.data), ("regions", args.regions_data)):
        if not (data / "test").is_dir():
            raise SystemExit(f"pretrain_study: no {task} demo set at {data} (make_demo_data.py)")
    init = pretrain(args)
    done: list[dict] = []
    for task, n, seed in plan(args):
        data = args.data if task == "lesion" else args.regions_data
        for arm in ARMS:
            done.append(fine_tune(args, task, data, n, seed, arm, init))
            write_section(args, done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

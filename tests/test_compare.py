"""scripts/compare.py: the order of its runs and its Markdown section, on constructed records;
no training. Its statistics are tested in tests/evaluation/test_comparison.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compare  # noqa: E402

# ------------------------------------------------------------------ predictions and the section


def write_predictions(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "prediction", "prob_a", "prob_b"])
        for scan, label, prediction in rows:
            p = 0.9 if prediction == "a" else 0.1
            writer.writerow([scan, label, prediction, f"{p:.6f}", f"{1 - p:.6f}"])
    return path


def test_plan_runs_the_pairs_first():
    study = make_study(Path("."), seeds=2)
    assert study.plan() == [
        ("seqnorm", 0),
        ("softmax", 0),
        ("seqnorm", 1),
        ("softmax", 1),
        ("densenet121", 0),
    ]


def make_study(tmp_path: Path, seeds: int = 2) -> compare.Study:
    return compare.Study(
        task="lesion",
        data=tmp_path / "data",
        config=tmp_path / "demo.yaml",
        runs=tmp_path / "runs" / "lesion",
        epochs=3,
        seeds=seeds,
        models=["seqnorm", "softmax", "densenet121"],
        single_seed=["densenet121"],
        overrides=[],
        output=tmp_path / "results.md",
        command="./scripts/compare.sh --epochs 3 --seeds 2",
        resamples=200,
    )


def fake_record(tmp_path: Path, model: str, seed: int, wrong: set[int]) -> dict:
    """A compare.json-like record of a run that got the 40 scans right except those in ``wrong``."""
    rows = [
        (f"s{i:02d}", "ab"[i % 2], "ab"[(i + (i in wrong)) % 2]) for i in range(40)
    ]  # a wrong scan gets the other class
    path = write_predictions(tmp_path / f"{model}-s{seed}" / "predictions.csv", rows)
    accuracy = 1 - len(wrong) / 40
    return {
        "test": {
            "num_scans": 40,
            "accuracy": accuracy,
            "balanced_accuracy": accuracy,
            "auroc": None,
        },
        "predictions": str(path),
        "epoch_seconds": [2.0, 3.0, 4.0],
        "seconds_per_epoch": 3.0,
        "epochs": 3,
        "best_epoch": 3,
        "parameters": 500_000,
        "peak_memory_gib": 1.5,
    }


def test_report_section(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".demo_args.json").write_text(
        json.dumps({"task": "lesion", "n_train": 16})
    )
    study = make_study(tmp_path)
    study.records = {
        ("seqnorm", 0): fake_record(tmp_path, "seqnorm", 0, {1, 2}),
        ("softmax", 0): fake_record(tmp_path, "softmax", 0, {3}),
        ("seqnorm", 1): fake_record(tmp_path, "seqnorm", 1, set()),
        ("softmax", 1): fake_record(tmp_path, "softmax", 1, {1, 2, 3}),
    }
    text = compare.report(study)
    assert text.startswith("## Lesion task: 3 epochs, 2 seeds")
    assert "**Incomplete:** 4 of 5 runs finished; pending: densenet121 seed 0." in text
    # seq-norm: accuracies 0.950 and 1.000 → mean 0.975, sd 0.035; AUROC undefined
    assert "| 2 | 0.50 M | 0.975 ± 0.035 | 0.975 ± 0.035 | n/a | 3.0 s | 1.50 GiB |" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # seed 0: 38 against 39 of 40 right; scan 3 only seq-norm got right, scans 1 and 2 only softmax
    assert rows["| 0"].startswith("| 0 | 0.950 | 0.975 | -2.5 |")
    assert rows["| 0"].endswith("| 1 | 2 | 1 |")  # McNemar: 2 (1 + 3) / 2^3 = 1
    assert rows["| 1"].endswith("| 3 | 0 | 0.25 |")  # 2 / 2^3
    assert rows["| pooled (0, 1)"].startswith("| pooled (0, 1) | 0.975 | 0.950 | +2.5 |")
    assert rows["| pooled (0, 1)"].endswith("| 4 | 2 | – |")
    assert "**Verdict:" in text and "<details>" in text

    compare.write_report(study)
    written = study.output.read_text()
    assert written.startswith(compare.TITLE)
    assert "<!-- compare lesion 3 epochs begin -->" in written
    compare.write_report(study)  # rewritten in place, not appended
    assert study.output.read_text().count("compare lesion 3 epochs begin") == 1


# ------------------------------------------------------------------------------------ the screen


def screen_record(train_loss_at_10: float, best: float, classes: int | None = 4) -> dict:
    curve = {"train_loss": [1.4] * 9 + [train_loss_at_10], "val_loss": [1.0] * 10}
    return {"curve": curve, "best_val_balanced_accuracy": best, "classes": classes}


def test_screen_puts_out_models_that_do_not_learn_or_do_not_generalize():
    study = make_study(Path("."))
    assert compare.screen_out(study, [screen_record(0.4, 0.97), screen_record(0.5, 0.90)]) == []
    slow = compare.screen_out(study, [screen_record(0.4, 0.97), screen_record(1.35, 0.90)])
    assert slow == ["out (training loss above 1.3 at epoch 10)"]
    # memorizing: the loss falls fastest, validation stays near chance (0.25 on four classes)
    memorized = compare.screen_out(study, [screen_record(0.2, 0.97), screen_record(0.2, 0.31)])
    assert memorized == ["out (validation balanced accuracy below 0.625)"]
    assert compare.screen_out(study, [screen_record(0.2, 0.70, classes=2)]) == [
        "out (validation balanced accuracy below 0.750)"
    ]
    # a record from before the class count was kept is judged by the loss alone
    assert compare.screen_out(study, [screen_record(0.2, 0.31, classes=None)]) == []


def test_validation_record_counts_the_classes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,val_balanced_accuracy,val_auroc,seconds\n"
        "1,1.0,1.1,0.5,0.6,2.0\n2,0.8,0.9,0.75,0.8,3.0\n"
    )
    summary = {"per_class": {"a": {"train": 4}, "b": {"train": 4}, "c": {"train": 4}}}
    (run / "dataset_summary.json").write_text(json.dumps(summary))
    record = compare.validation_record(run)
    assert record["classes"] == 3 and record["best_val_balanced_accuracy"] == 0.75
    assert record["best_epoch"] == 2


def test_parameter_count_leaves_out_buffers():
    from volumetric.checkpoint import Checkpoint
    from volumetric.models.registry import build_model

    args = {"num_classes": 2, "in_channels": 1}
    model = build_model("densenet121", args)
    state = Checkpoint("densenet121", args, ["a", "b"], {}, model.state_dict())
    weights = sum(v.numel() for v in state.weights.values() if v.is_floating_point())
    parameters = sum(p.numel() for p in model.parameters())
    assert compare.parameter_count(state) == parameters < weights  # BatchNorm's running stats

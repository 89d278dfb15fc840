"""K-fold cross-validation (volumetric-train --folds K) and ensembles of checkpoints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIG,
    assert_one_line_error,
    assert_same_weights,
    read_csv,
    train,
    weights,
    write_config,
)

from volumetric.checkpoint import load_checkpoint, save_checkpoint
from volumetric.cli import evaluate_main, infer_main
from volumetric.engine.folds import fold_splits
from volumetric.errors import VolumetricError
from volumetric.inference import Predictor
from volumetric.models.vit3d import VolumeTransformer

FOLDS_CONFIG = {
    **TINY_CONFIG,
    "train": {**TINY_CONFIG["train"], "threshold": "youden", "positive_class": "lesion"},
}


def test_folds_keep_groups_whole_and_classes_balanced():
    rng = np.random.default_rng(0)
    groups = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 scans each
    labels = [int(g[1:]) % 2 for g in groups]  # a patient's scans share its class
    folds = fold_splits(labels, groups, 4, seed=1, class_names=["a", "b"])
    assert len(folds) == 4
    seen = sorted(i for _, val in folds for i in val)
    assert seen == list(range(60))  # every scan validated exactly once
    for train_idx, val_idx in folds:
        assert not {groups[i] for i in train_idx} & {groups[i] for i in val_idx}
        counts = Counter(labels[i] for i in val_idx)
        assert abs(counts[0] - counts[1]) <= 3  # one patient of 3 scans at most apart
    again = fold_splits(labels, groups, 4, seed=1, class_names=["a", "b"])
    assert again == folds and fold_splits(labels, groups, 4, 2, ["a", "b"]) != folds
    del rng


def test_a_fold_without_a_class_is_one_error():
    labels = [0] * 10 + [1] * 2  # two scans of b cannot reach three folds
    with pytest.raises(VolumetricError, match="fold 3's validation part has no scan of class b"):
        fold_splits(labels, [None] * 12, 3, seed=0, class_names=["a", "b"])
    with pytest.raises(VolumetricError, match="at least 2 folds"):
        fold_splits(labels, [None] * 12, 1, seed=0, class_names=["a", "b"])


def folds_train(data: Path, run: Path, config: Path, *extra: str) -> int:
    return train(data, run, config, "--folds", "3", *extra)


@pytest.fixture(scope="module")
def folds_run(tiny_dataset_shared: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    assert (
        folds_train(tiny_dataset_shared, root / "run", write_config(root / "c.yaml", FOLDS_CONFIG))
        == 0
    )
    return root / "run"


@pytest.mark.slow  # three folds trained
def test_the_folds_run_and_its_summary(folds_run: Path):
    names = {p.name for p in folds_run.iterdir()}
    assert {
        "fold-1",
        "fold-2",
        "fold-3",
        "folds.json",
        "oof_predictions.csv",
        "summary.md",
    } <= names
    header, rows = read_csv(folds_run / "oof_predictions.csv")
    assert header[:5] == ["path", "series_uid", "label", "fold", "prediction"]
    assert len(rows) == 20 and len({r["path"] for r in rows}) == 20  # each scan once
    for row in rows:  # predicted by the model that did not train on it
        split = read_csv(folds_run / f"fold-{row['fold']}" / "split.csv")[1]
        roles = {r["path"]: r["role"] for r in split}
        assert roles[row["path"]] == "validation"
    summary = json.loads((folds_run / "folds.json").read_text())
    assert summary["members"] == ["fold-1/best.pt", "fold-2/best.pt", "fold-3/best.pt"]
    accuracies = [f["accuracy"] for f in summary["per_fold"]]
    assert summary["mean_sd"]["accuracy"][0] == pytest.approx(np.mean(accuracies))
    assert summary["out_of_fold"]["num_scans"] == 20
    # the ensemble's threshold: fitted on the out-of-fold probabilities of the positive class
    assert summary["decision"]["rule"] == "youden" and summary["decision"]["threshold"] is not None
    assert "mean ± sd" in (folds_run / "summary.md").read_text()


@pytest.mark.slow  # three folds trained
def test_a_killed_fold_resumes_and_the_finished_ones_stay(
    folds_run, tiny_dataset_shared, tmp_path, monkeypatch
):
    """Stopped in fold 2's second epoch: the same command again leaves fold 1 as it was, resumes
    fold 2 and trains fold 3, to the weights of the run that never stopped."""
    import volumetric.engine.objective as objective

    config = write_config(tmp_path / "c.yaml", FOLDS_CONFIG)
    run = tmp_path / "run"
    calls, predict = [], objective.predict

    def stop_in_fold_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # validations: fold 1 epochs 1, 2, then fold 2 epoch 1, 2
            raise KeyboardInterrupt
        return predict(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(objective, "predict", stop_in_fold_2)
        assert folds_train(tiny_dataset_shared, run, config) == 130
    assert not (run / "folds.json").exists() and not (run / "fold-3").exists()
    fold_1 = (run / "fold-1" / "best.pt").stat().st_mtime_ns
    assert folds_train(tiny_dataset_shared, run, config) == 0
    assert (run / "fold-1" / "best.pt").stat().st_mtime_ns == fold_1
    for k in (1, 2, 3):
        assert_same_weights(
            weights(run / f"fold-{k}" / "last.pt"), weights(folds_run / f"fold-{k}" / "last.pt")
        )
    # another configuration into the same folder is refused
    assert folds_train(tiny_dataset_shared, run, config, "--train.epochs=3") == 2


@pytest.mark.slow  # three folds trained
def test_the_folds_folder_is_an_ensemble(folds_run, tiny_dataset_shared, tmp_path):
    scans = sorted((tiny_dataset_shared / "lesion").iterdir())[:3]
    output = tmp_path / "p.csv"
    assert (
        infer_main([str(folds_run), *map(str, scans), "--output", str(output), "--no-progress"])
        == 0
    )
    header, rows = read_csv(output)
    assert "prob_std_lesion" in header  # the spread over the three members
    members = [Predictor(folds_run / f"fold-{k}" / "best.pt", device="cpu") for k in (1, 2, 3)]
    threshold = json.loads((folds_run / "folds.json").read_text())["decision"]["threshold"]
    for scan, row in zip(scans, rows):
        probs = np.array([m(scan).probs for m in members])  # (3, 2)
        assert float(row["prob_lesion"]) == pytest.approx(probs[:, 1].mean(), abs=2e-6)
        assert float(row["prob_std_lesion"]) == pytest.approx(probs[:, 1].std(ddof=1), abs=2e-6)
        assert row["prediction"] == ("lesion" if probs[:, 1].mean() >= threshold else "healthy")
    out = tmp_path / "eval"
    argv = [str(folds_run), str(tiny_dataset_shared), "--output-dir", str(out), "--no-progress"]
    assert evaluate_main([*argv, "--no-report"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_scans"] == 20


def test_members_that_differ_are_one_error(trained_run, tiny_dataset_shared, tmp_path, capsys):
    other = tmp_path / "other.pt"
    state = load_checkpoint(trained_run / "best.pt")
    torch.manual_seed(0)
    save_checkpoint(
        other,
        model=VolumeTransformer(**state.model_args),
        model_args=state.model_args,
        class_names=["healthy", "tumour"],
        preprocessing=state.preprocessing,
        config=state.config,
    )
    scan = sorted((tiny_dataset_shared / "lesion").iterdir())[0]
    argv = [
        str(trained_run / "best.pt"),
        str(other),
        str(scan),
        "--output",
        str(tmp_path / "p.csv"),
    ]
    assert infer_main(argv) == 2
    assert_one_line_error(capsys, "volumetric-infer", "differ in class names", "tumour")
    save_checkpoint(
        other,
        model=VolumeTransformer(**state.model_args),
        model_args=state.model_args,
        class_names=state.class_names,
        preprocessing={**state.preprocessing, "spacing": 3.0},
        config=state.config,
    )
    assert infer_main(argv) == 2
    assert_one_line_error(capsys, "volumetric-infer", "differ in preprocessing")

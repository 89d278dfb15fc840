"""End-to-end, in-process: volumetric-train → volumetric-infer / volumetric-evaluate on tiny NIfTI data."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    TINY_CONFIG,
    assert_one_line_error,
    assert_same_weights,
    read_csv,
    train,
    train_stopped_in_epoch_2,
    weights,
    write_config,
    write_scan,
)

from volumetric.checkpoint import load_checkpoint, save_checkpoint
from volumetric.cli import evaluate_main, export_main, infer_main, train_main
from volumetric.data.dataset import load_subject
from volumetric.models.registry import build_model
from volumetric.models.vit3d import VolumeTransformer
from volumetric.transforms import build_preprocessing

METRIC_HEADER = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_auroc",
    "seconds",
]
PREDICTION_HEADER = ["path", "series_uid", "prediction", "prob_healthy", "prob_lesion", "error"]

# ---------------------------------------------------------------------------------------------- train


def test_train_writes_run_folder(trained_run):
    assert sorted(p.name for p in trained_run.iterdir()) == [
        "best.pt",
        "config.yaml",
        "dataset_summary.json",
        "last.pt",
        "learning_curves.png",
        "metrics.csv",
        "report.html",
        "split.csv",
        "tensorboard",
    ]
    header, rows = read_csv(trained_run / "metrics.csv")
    assert header == METRIC_HEADER
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # 16 training scans (20 less a 20% validation split) in batches of 4
    assert int(rows[-1]["step"]) == 2 * 4
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0
        assert math.isfinite(float(row["val_loss"]))
        for key in ("val_accuracy", "val_balanced_accuracy", "val_auroc"):
            assert 0.0 <= float(row[key]) <= 1.0
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["model"]["embed_dim"] == 24 and saved["train"]["epochs"] == 2
    assert saved["data"]["target_shape"] == [16, 16, 16]
    assert saved["augment"] == [{"RandomFlip": {"axes": [0]}}]


def test_checkpoint_is_self_describing(trained_run):
    state = load_checkpoint(trained_run / "last.pt")
    assert state.class_names == ["healthy", "lesion"]
    assert state.model_args["num_classes"] == 2 and state.model_args["embed_dim"] == 24
    assert state.preprocessing["target_shape"] == [16, 16, 16]
    assert state.preprocessing["patch_size"] == 4
    assert state.epoch == 2
    assert state.arch == "vit3d"
    model = VolumeTransformer(**state.model_args)  # the model's constructor arguments, exactly
    model.load_state_dict(state.weights)  # the weights fit the arguments it carries
    assert 1 <= load_checkpoint(trained_run / "best.pt").epoch <= 2


def test_train_softmax_attention(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert (
        train(
            tiny_dataset,
            run,
            write_config(tmp_path / "tiny.yaml"),
            "--model.attention=softmax",
            "--train.epochs=1",
        )
        == 0
    )
    assert load_checkpoint(run / "last.pt").model_args["attention"] == "softmax"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["attention"] == "softmax"
    header, rows = read_csv(run / "metrics.csv")
    assert header == METRIC_HEADER and len(rows) == 1


def test_same_seed_same_weights(trained_run, tiny_dataset_shared, tmp_path):
    run = tmp_path / "again"
    assert train(tiny_dataset_shared, run, write_config(tmp_path / "tiny.yaml")) == 0
    first, second = weights(trained_run / "last.pt"), weights(run / "last.pt")
    assert_same_weights(first, second)
    # training did move the weights: a fresh model of the same seed differs
    torch.manual_seed(0)
    fresh = build_model("vit3d", load_checkpoint(run / "last.pt").model_args).state_dict()
    assert not torch.equal(fresh["patch_embed.proj.weight"], first["patch_embed.proj.weight"])


def test_resume_continues_to_more_epochs(trained_run, tiny_dataset_shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _, before = read_csv(run / "metrics.csv")
    assert train(tiny_dataset_shared, run, None, "--resume", "--train.epochs=3") == 0
    header, rows = read_csv(run / "metrics.csv")
    assert header == METRIC_HEADER
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:2] == before  # the history of the first two epochs is kept as it was
    assert int(rows[2]["step"]) == 3 * 4
    assert load_checkpoint(run / "last.pt").epoch == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            weights(trained_run / "last.pt").values(), weights(run / "last.pt").values()
        )
    )


@pytest.mark.parametrize("cache", ["disk", "memory", "none"])
def test_interrupted_run_resumes_exactly(
    cache, trained_run, tiny_dataset_shared, tmp_path, monkeypatch, capsys
):
    """Stop a 2-epoch run during epoch 2 (after epoch 1 was saved) and resume it: the final weights must
    equal those of the run that was never stopped (train.py: "a run resumed from last.pt follows the
    same path as one never stopped")."""
    config = write_config(tmp_path / "tiny.yaml")
    flag = f"--train.cache={cache}"
    if cache == "disk":
        reference = trained_run  # the default, cache: disk
    else:
        reference = tmp_path / "reference"
        assert train(tiny_dataset_shared, reference, config, flag) == 0
    run = tmp_path / "run"
    stopped = train_stopped_in_epoch_2(monkeypatch, tiny_dataset_shared, run, config, flag)
    assert stopped == 130
    assert "interrupted" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert train(tiny_dataset_shared, run, None, "--resume") == 0
    _, rows = read_csv(run / "metrics.csv")
    _, expected = read_csv(reference / "metrics.csv")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in expected]
    assert_same_weights(weights(run / "last.pt"), weights(reference / "last.pt"))


# ---------------------------------------------------------------------------------------------- infer


def check_prediction_rows(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert row["error"] == ""
        probs = {"healthy": float(row["prob_healthy"]), "lesion": float(row["prob_lesion"])}
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == max(probs, key=probs.get)


def test_infer_other_size_and_folder(trained_run, tiny_dataset_shared, tmp_path):
    rng = np.random.default_rng(1)
    other = write_scan(
        tmp_path / "scans" / "other.nii.gz",
        rng.normal(100, 10, (30, 26, 22)),
        spacing=(1.2, 1.2, 1.2),
    )
    output = tmp_path / "out" / "predictions.csv"
    code = infer_main(
        [
            str(trained_run / "best.pt"),
            str(other),
            str(tiny_dataset_shared / "lesion"),
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0
    header, rows = read_csv(output)
    assert header == PREDICTION_HEADER
    assert len(rows) == 1 + 10
    assert rows[0]["path"] == str(other)
    assert [Path(r["path"]).name for r in rows[1:]] == sorted(
        p.name for p in (tiny_dataset_shared / "lesion").iterdir()
    )
    check_prediction_rows(rows)


@pytest.mark.filterwarnings("ignore:Error loading image")
def test_infer_bad_scan_gets_an_error_row(trained_run, tmp_path):
    good = write_scan(tmp_path / "good.nii", np.random.default_rng(2).normal(size=(12, 12, 12)))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    output = tmp_path / "p.csv"
    assert (
        infer_main(
            [
                str(trained_run / "last.pt"),
                str(good),
                str(broken),
                "--output",
                str(output),
                "--no-progress",
            ]
        )
        == 1
    )
    header, rows = read_csv(output)
    assert header == PREDICTION_HEADER
    check_prediction_rows(rows[:1])
    assert rows[1]["path"] == str(broken)
    assert (
        rows[1]["prediction"] == ""
        and rows[1]["prob_healthy"] == ""
        and "broken.nii.gz" in rows[1]["error"]
    )


def test_infer_native_grid_any_size(tmp_path):
    """A checkpoint without a target shape runs each scan at its own (padded) grid size."""
    torch.manual_seed(0)
    model_args = dict(num_classes=2, patch_size=4, embed_dim=24, depth=1, num_heads=2)
    model = VolumeTransformer(**model_args)
    preprocessing = {
        "spacing": None,
        "target_shape": None,
        "intensity": "zscore",
        "ct_window": [-1000.0, 1000.0],
        "canonical": True,
        "patch_size": 4,
    }
    checkpoint = tmp_path / "native.pt"
    save_checkpoint(
        checkpoint,
        model=model,
        model_args=model_args,
        class_names=["healthy", "lesion"],
        preprocessing=preprocessing,
        config={},
    )
    rng = np.random.default_rng(3)
    scans = [
        write_scan(tmp_path / "s" / f"{i}.nii.gz", rng.normal(100, 10, shape))
        for i, shape in enumerate([(8, 8, 8), (30, 26, 22)])
    ]
    output = tmp_path / "p.csv"
    assert (
        infer_main([str(checkpoint), str(tmp_path / "s"), "--output", str(output), "--no-progress"])
        == 0
    )
    _, rows = read_csv(output)
    check_prediction_rows(rows)
    pipeline = build_preprocessing(preprocessing, 4)
    model.eval()
    for scan, row in zip(scans, rows):
        image = load_subject(scan, pipeline).image.data
        assert image.shape[1:] == tuple(-(-s // 4) * 4 for s in np.asarray(nib_shape(scan)))
        with torch.no_grad():
            probs = model(image[None].float()).softmax(1)[0]
        assert float(row["prob_lesion"]) == pytest.approx(probs[1].item(), abs=1e-5)


def nib_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return nib.load(str(path)).shape


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_writes_metrics(trained_run, tiny_dataset_shared, tmp_path):
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                str(trained_run / "best.pt"),
                str(tiny_dataset_shared),
                "--output-dir",
                str(out),
                "--no-progress",
                "--report-cases",  # one relevance map, not 8 (tests/evaluation/test_report.py)
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_scans"] == 20
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        assert 0.0 <= metrics[key] <= 1.0
    header, rows = read_csv(out / "predictions.csv")
    assert header == ["path", "series_uid", "label", "prediction", "prob_healthy", "prob_lesion"]
    assert len(rows) == 20
    correct = sum(r["label"] == r["prediction"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(correct / 20)
    assert {r["label"] for r in rows} == {"healthy", "lesion"}


def test_evaluate_unknown_label_is_an_error(trained_run, tmp_path, capsys):
    write_scan(tmp_path / "data" / "tumour" / "a.nii", np.zeros((8, 8, 8)))
    code = evaluate_main(
        [
            str(trained_run / "best.pt"),
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert_one_line_error(capsys, "volumetric-evaluate", "tumour")


# ---------------------------------------------------------------------------------------------- errors


def test_error_missing_data_folder(tmp_path, capsys):
    code = train(tmp_path / "nope", tmp_path / "run", write_config(tmp_path / "tiny.yaml"))
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "nope")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_error_unknown_config_key(tiny_dataset, tmp_path, capsys):
    code = train(
        tiny_dataset, tmp_path / "run", write_config(tmp_path / "tiny.yaml"), "--train.bogus=1"
    )
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "train.bogus")
    assert not (tmp_path / "run").exists()


def test_error_bad_config_value(tiny_dataset, tmp_path, capsys):
    code = train(
        tiny_dataset,
        tmp_path / "run",
        write_config(tmp_path / "tiny.yaml"),
        "--data.target_shape=[15,16,16]",
    )
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "target_shape")


@pytest.mark.parametrize(
    "main,prog", [(infer_main, "volumetric-infer"), (evaluate_main, "volumetric-evaluate")]
)
def test_error_missing_checkpoint(main, prog, tiny_dataset, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    scan = next((tiny_dataset / "healthy").iterdir())
    args = (
        [str(scan), "--output", str(tmp_path / "p.csv")]
        if main is infer_main
        else [str(tiny_dataset), "--output-dir", str(tmp_path / "o")]
    )
    assert main([str(missing), *args, "--no-progress"]) == 2
    assert_one_line_error(capsys, prog, "missing.pt")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "o").exists()


def test_error_corrupt_and_unsafe_checkpoints(tiny_dataset, tmp_path, capsys):
    scan = str(next((tiny_dataset / "healthy").iterdir()))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert (
        infer_main([str(garbage), scan, "--output", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    )
    assert_one_line_error(capsys, "volumetric-infer", "garbage.pt")
    unsafe = tmp_path / "unsafe.pt"
    torch.save(
        {"format": "volumetric-checkpoint", "payload": Path("x")}, unsafe
    )  # a pickled class: not weights-only
    assert (
        infer_main([str(unsafe), scan, "--output", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    )
    assert_one_line_error(capsys, "volumetric-infer", "unsafe.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert (
        infer_main([str(foreign), scan, "--output", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    )
    assert_one_line_error(capsys, "volumetric-infer", "not a volumetric checkpoint")


def test_error_existing_run_without_resume(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"previous run")
    code = train(tiny_dataset, run, write_config(tmp_path / "tiny.yaml"))
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "--resume")
    assert (run / "last.pt").read_bytes() == b"previous run"
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_error_resume_without_a_run(tiny_dataset, tmp_path, capsys):
    code = train(tiny_dataset, tmp_path / "run", write_config(tmp_path / "tiny.yaml"), "--resume")
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "last.pt")


def test_error_no_scans_for_inference(trained_run, tmp_path, capsys):
    """A folder without scans is not left out silently: it gets an error row (exit status 1)."""
    (tmp_path / "empty").mkdir()
    assert (
        infer_main(
            [
                str(trained_run / "last.pt"),
                str(tmp_path / "empty"),
                "--output",
                str(tmp_path / "p.csv"),
                "--no-progress",
            ]
        )
        == 1
    )
    _, rows = read_csv(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(tmp_path / "empty")]
    assert rows[0]["prediction"] == "" and "no scans found" in rows[0]["error"]
    assert "(1 failed)" in capsys.readouterr().out


def test_unknown_flag_is_a_usage_error(tiny_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([str(tiny_dataset), "--output-dir", str(tmp_path / "run"), "--bogus"])
    assert exit_info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,key",
    [
        ("--model.embed_dim=25", "embed_dim"),
        ("--model.dropout=1.5", "dropout"),
        ("--model.patch_size=[4,4]", "patch_size"),
    ],
)
def test_error_bad_model_argument_is_one_line(override, key, tiny_dataset, tmp_path, capsys):
    """Bad model arguments are caught by the config's check, which reuses VolumeTransformer's own
    (a ConfigError naming the key): one line and exit status 2, never a traceback."""
    try:
        code = train(tiny_dataset, tmp_path / "run", write_config(tmp_path / "tiny.yaml"), override)
    except ValueError as error:
        pytest.fail(f"{override}: ValueError escaped the CLI instead of exit status 2: {error}")
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", key)


# ---------------------------------------------------------------------------------------------- data sources


def test_train_with_separate_val_and_manifest(tiny_dataset, tmp_path):
    """Training data from a CSV manifest (relative paths), validation from a class-folder tree."""
    rows = ["path,label"] + [
        f"data/{p.parent.name}/{p.name},{p.parent.name}"
        for p in sorted(tiny_dataset.rglob("scan0[0-5]*"))
    ]
    manifest = tmp_path / "train.csv"
    manifest.write_text("\n".join(rows) + "\n")
    val = tmp_path / "val"
    for p in sorted(tiny_dataset.rglob("scan0[6-9]*")):
        (val / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, val / p.parent.name / p.name)
    run = tmp_path / "run"
    assert (
        train(
            manifest,
            run,
            write_config(tmp_path / "tiny.yaml"),
            "--val",
            str(val),
            "--train.epochs=1",
        )
        == 0
    )
    _, rows_out = read_csv(run / "metrics.csv")
    assert int(rows_out[0]["step"]) == 3  # all 12 manifest scans train (no split), batches of 4
    assert rows_out[0]["val_accuracy"] != ""


def test_train_without_validation(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        train(
            tiny_dataset,
            run,
            write_config(tmp_path / "tiny.yaml"),
            "--train.val_fraction=0",
            "--train.epochs=1",
        )
        == 0
    )
    _, rows = read_csv(run / "metrics.csv")
    assert int(rows[0]["step"]) == 5  # all 20 scans train
    assert rows[0]["val_accuracy"] == "" and rows[0]["val_loss"] == ""
    assert (run / "best.pt").exists()
    assert "no validation set" in capsys.readouterr().out


def test_resume_with_other_model_is_an_error(trained_run, tiny_dataset_shared, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert (
        train(tiny_dataset_shared, run, None, "--resume", "--model.depth=3", "--train.epochs=3")
        == 2
    )
    assert_one_line_error(capsys, "volumetric-train", "model settings")
    assert load_checkpoint(run / "last.pt").epoch == 2


# ----------------------------------------------------------------------- bugs, configs, export


def test_a_bug_is_reported_as_one_and_debug_shows_it(trained_run, tmp_path, capsys, monkeypatch):
    """An exception that is not a VolumetricError is not the user's fault: one line saying it is
    a bug, exit status 70; --debug lets the traceback through."""
    import volumetric.data.discovery as discovery

    def broken(inputs):
        raise KeyError("an index the code got wrong")

    monkeypatch.setattr(discovery, "find_scans", broken)
    args = [str(trained_run / "best.pt"), str(tmp_path), "--output", str(tmp_path / "p.csv")]
    assert infer_main(args) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("volumetric-infer: internal error (a bug"), err
    assert "KeyError" in err[0] and "--debug" in err[0]
    with pytest.raises(KeyError, match="an index the code got wrong"):
        infer_main([*args, "--debug"])


def test_print_config_merges_files_and_overrides(tmp_path, capsys):
    base = write_config(tmp_path / "base.yaml")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("train: {epochs: 7}\nmodel: {pool: max}\n")
    args = ["--config", str(base), "--config", str(experiment), "--train.lr=2e-4"]
    assert train_main([*args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 7 and printed["train"]["lr"] == 2e-4
    assert printed["model"]["pool"] == "max" and printed["model"]["embed_dim"] == 24  # the base's
    assert printed["train"]["batch_size"] == TINY_CONFIG["train"]["batch_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "exp.yaml"]  # no run


def test_learning_rate_is_logged_in_scientific_notation(tiny_dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="volumetric")
    config = write_config(tmp_path / "tiny.yaml")
    assert train(tiny_dataset, tmp_path / "run", config, "--train.epochs=1") == 0
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1")]
    assert epoch_lines and re.search(r"lr=\d\.\d{3}e[-+]\d\d", epoch_lines[0]), epoch_lines


def test_export_command_writes_a_model_that_onnxruntime_runs(trained_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    output = tmp_path / "model.onnx"
    assert (
        export_main([str(trained_run / "best.pt"), "--format", "onnx", "--output", str(output)])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    tensor = np.load(tmp_path / "model.reference_tensor.npy")  # (C, W, H, D)
    expected = np.load(tmp_path / "model.reference_probabilities.npy")  # (1, K)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"volume": tensor[None].astype(np.float32)})
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    wrong_suffix = tmp_path / "model.pt2"
    args = [str(trained_run / "best.pt"), "--format", "onnx", "--output", str(wrong_suffix)]
    assert export_main(args) == 2 and not wrong_suffix.exists()

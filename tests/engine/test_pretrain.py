"""volumetric-pretrain: masked-volume pretraining on unlabeled scans, its run folder, exact resume,
bad input, and fine-tuning from it with volumetric-train --init."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    TINY_CONFIG,
    assert_one_line_error,
    assert_png,
    assert_same_weights,
    read_csv,
    train,
    weights,
    write_config,
)

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import infer_main, pretrain_main
from volumetric.config import load_config
from volumetric.engine.pretrain import MaskedModeling
from volumetric.engine.setup import _lr_scale, parameter_groups
from volumetric.models.vit3d import VolumeTransformer

PRETRAIN_CONFIG = {
    **TINY_CONFIG,
    "train": {**TINY_CONFIG["train"], "epochs": 2},
    "pretrain": {
        "epochs": 3,
        "decoder_dim": 16,
        "decoder_heads": 2,
        "decoder_depth": 1,
        "held_out": 0.2,
        "pictures": 2,
    },
}


def pretrain(inputs: list[Path], run: Path, config: Path, *extra: str) -> int:
    argv = [*map(str, inputs), "--output-dir", str(run), "--no-progress", "--config", str(config)]
    return pretrain_main([*argv, *extra])


@pytest.fixture(scope="module")
def unlabeled(tiny_dataset_shared: Path, tmp_path_factory) -> Path:
    """The tiny data set's scans without classes, at several depths."""
    root = tmp_path_factory.mktemp("unlabeled") / "archive"
    for i, scan in enumerate(sorted(tiny_dataset_shared.rglob("scan*"))):
        folder = root / f"patient{i % 3}" / ("study" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(scan, folder / f"{scan.parent.name}_{scan.name}")
    return root


@pytest.fixture(scope="module")
def pretrained_run(unlabeled: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    run = root / "run"
    assert pretrain([unlabeled], run, write_config(root / "p.yaml", PRETRAIN_CONFIG)) == 0
    return run


def test_the_run_folder(pretrained_run: Path):
    names = {p.name for p in pretrained_run.iterdir()}
    expected = {"pretrained.pt", "last.pt", "metrics.csv", "config.yaml", "dataset_summary.json"}
    assert expected | {"reconstructions.png", "report.html", "learning_curves.png"} <= names
    header, rows = read_csv(pretrained_run / "metrics.csv")
    assert header == ["epoch", "step", "lr", "train_loss", "val_loss", "seconds"]
    assert len(rows) == 3 and all(float(r["val_loss"]) > 0 for r in rows)
    summary = yaml.safe_load((pretrained_run / "dataset_summary.json").read_text())
    assert summary["usable"] == 20  # every scan, from every depth
    assert_png(pretrained_run / "reconstructions.png", min_bytes=2_000)
    page = (pretrained_run / "report.html").read_text()
    assert "What it learnt" in page and page.count("data:image/png;base64,") >= 2


def test_pretrained_pt_is_the_encoder_alone(pretrained_run: Path):
    encoder = load_checkpoint(pretrained_run / "pretrained.pt")
    assert encoder.arch == "vit3d" and encoder.class_names == []
    assert encoder.pretraining["mask_ratio"] == 0.75
    assert encoder.pretraining["training_scans"] + encoder.pretraining["held_out_scans"] == 20
    assert not any(k.startswith(("head.", "decoder", "mask_token")) for k in encoder.weights)
    model = VolumeTransformer(**encoder.model_args)
    missing = model.load_state_dict(encoder.weights, strict=False).missing_keys
    assert sorted(missing) == ["head.bias", "head.weight"]
    last = load_checkpoint(pretrained_run / "last.pt")
    assert any(k.startswith("decoder_blocks.") for k in last.weights) and last.training


def test_a_pretraining_checkpoint_is_not_a_classifier(pretrained_run, unlabeled, tmp_path, capsys):
    scan = next(unlabeled.rglob("*.nii.gz"))
    status = infer_main(
        [str(pretrained_run / "pretrained.pt"), str(scan), "--output", str(tmp_path / "p.csv")]
    )
    assert status == 2
    assert_one_line_error(capsys, "volumetric-infer", "pretraining checkpoint", "--init")


def test_fine_tuning_takes_the_architecture_and_records_the_encoder(
    pretrained_run, tiny_dataset_shared, tmp_path, capsys
):
    """--init RUN/pretrained.pt with a config that names no model: the encoder's architecture,
    its weights, a new head; the checkpoint records where the encoder came from."""
    config = {k: v for k, v in PRETRAIN_CONFIG.items() if k not in ("model", "pretrain")}
    config["train"] = {**config["train"], "epochs": 1, "encoder_lr_scale": 0.5}
    path = write_config(tmp_path / "ft.yaml", config)
    init = pretrained_run / "pretrained.pt"
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, path, "--init", str(init)) == 0
    tuned = load_checkpoint(run / "last.pt")
    encoder = load_checkpoint(init)
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "attention"):
        assert tuned.model_args[key] == encoder.model_args[key], key
    assert tuned.lineage["path"] == str(init) and tuned.lineage["pretraining"]["epochs"] == 3
    assert len(tuned.lineage["sha256"]) == 64
    # the config naming another width: one line naming the key, no run folder
    other = tmp_path / "other"
    assert train(tiny_dataset_shared, other, path, "--init", str(init), "--model.embed_dim=48") == 2
    assert_one_line_error(capsys, "volumetric-train", "model.embed_dim=48", "embed_dim=24")
    assert not other.exists()


def test_pretraining_resumes_to_the_uninterrupted_weights(
    unlabeled, pretrained_run, tmp_path, monkeypatch
):
    """SIGINT in the middle of epoch 2 saves a resumable last.pt; --resume reaches the weights of
    the run that never stopped, bit for bit (the masks depend on seed, epoch and scan only)."""
    run = tmp_path / "run"
    calls, loss = [], MaskedModeling.loss

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # epoch 2 (4 batches an epoch), its second batch
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, *args, **kwargs)

    config = write_config(tmp_path / "p.yaml", PRETRAIN_CONFIG)
    with monkeypatch.context() as patch:
        patch.setattr(MaskedModeling, "loss", interrupted)
        assert pretrain([unlabeled], run, config) == 128 + signal.SIGINT
    partial = load_checkpoint(run / "last.pt")
    assert partial.epoch == 1 and partial.training["partial"]["batch"] == 2
    assert pretrain([unlabeled], run, config, "--resume") == 0
    assert_same_weights(weights(run / "last.pt"), weights(pretrained_run / "last.pt"))
    assert_same_weights(weights(run / "pretrained.pt"), weights(pretrained_run / "pretrained.pt"))


def test_a_manifest_of_paths_and_bad_scans(unlabeled, tmp_path, capsys):
    scans = sorted(unlabeled.rglob("*.nii*"))[:6]
    (tmp_path / "broken.nii.gz").write_text("not a scan")
    manifest = tmp_path / "pool.csv"
    rows = [str(s) for s in scans] + [str(tmp_path / "broken.nii.gz")]
    manifest.write_text("path\n" + "\n".join(rows) + "\n")
    config = write_config(
        tmp_path / "p.yaml",
        {
            **PRETRAIN_CONFIG,
            "pretrain": {**PRETRAIN_CONFIG["pretrain"], "epochs": 1, "held_out": 0.3},
        },
    )
    assert pretrain([manifest], tmp_path / "run", config) == 2
    assert_one_line_error(capsys, "volumetric-pretrain", "broken.nii.gz")
    skip = pretrain([manifest], tmp_path / "run2", config, "--data.on_bad_scan=skip", "--no-report")
    assert skip == 0
    assert yaml.safe_load((tmp_path / "run2" / "dataset_summary.json").read_text())["usable"] == 6


def test_print_config_and_bad_values(capsys):
    assert pretrain_main(["--print-config", "--pretrain.mask_ratio=0.6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["mask_ratio"] == 0.6 and printed["pretrain"]["epochs"] == 100
    for bad, key in [
        ("--pretrain.mask_ratio=1.0", "mask_ratio"),
        ("--pretrain.decoder_dim=10", "decoder_dim"),
    ]:
        assert pretrain_main(["--print-config", bad]) == 2
        assert_one_line_error(capsys, "volumetric-pretrain", f"pretrain.{key}")


def test_encoder_learning_rates_by_layer():
    """encoder_lr_scale and layer_decay: the head at lr, the final norm at lr · scale, block i of
    D at lr · scale · decay^(D − i), the patch embedding at lr · scale · decay^(D + 1); with both at
    1, the two groups of a plain run."""
    model = VolumeTransformer(num_classes=2, patch_size=4, embed_dim=24, depth=3, num_heads=2)
    config = load_config(None, ["--train.encoder_lr_scale=0.5", "--train.layer_decay=0.5"])
    groups = parameter_groups(model, 1.0, 0.05, _lr_scale(model, config))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == 1.0
    assert lr_of[id(named["norm.weight"])] == 0.5
    assert lr_of[id(named["blocks.2.attn.qkv.weight"])] == 0.25
    assert lr_of[id(named["blocks.0.mlp.fc1.weight"])] == 0.5 * 0.5**3
    assert lr_of[id(named["patch_embed.proj.weight"])] == 0.5 * 0.5**4
    plain = parameter_groups(model, 1.0, 0.05, _lr_scale(model, load_config(None)))
    assert len(plain) == 2 and [g["weight_decay"] for g in plain] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in plain) == len(named)


@pytest.mark.slow  # two processes under torchrun
def test_pretraining_under_torchrun(unlabeled, tmp_path):
    from test_distributed import torchrun

    config = write_config(
        tmp_path / "p.yaml",
        {**PRETRAIN_CONFIG, "pretrain": {**PRETRAIN_CONFIG["pretrain"], "epochs": 1}},
    )
    run = tmp_path / "run"
    args = [str(unlabeled), "--output-dir", str(run), "--no-progress", "--config", str(config)]
    done = torchrun("-m", "volumetric", "pretrain", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(run / "pretrained.pt").pretraining is not None
    assert torch.isfinite(
        torch.tensor([float(r["val_loss"]) for r in read_csv(run / "metrics.csv")[1]])
    ).all()

"""Architectures by name: the seq-norm ViT and MONAI's DenseNet121 baseline train and infer alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIG,
    assert_one_line_error,
    read_csv,
    train,
    write_config,
    write_scan,
)

from volumetric.checkpoint import load_checkpoint, save_checkpoint
from volumetric.cli import infer_main
from volumetric.config import Config, load_config
from volumetric.errors import VolumetricError
from volumetric.models.registry import architecture, architectures, build_model, model_arguments
from volumetric.models.vit3d import VolumeTransformer


def test_default_architecture_is_the_seqnorm_vit():
    args = model_arguments(
        "vit3d", {"patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}, num_classes=3
    )
    assert isinstance(build_model("vit3d", args), VolumeTransformer)
    assert Config().model.arch == "vit3d"


def test_densenet121_maps_volumes_to_logits():
    # the ViT's keys in the model section are not the CNN's arguments: left out
    args = model_arguments("densenet121", {"in_channels": 2, "patch_size": 8}, num_classes=3)
    assert args == {"num_classes": 3, "in_channels": 2}
    model = build_model("densenet121", args)
    assert model(torch.randn(2, 2, 32, 40, 32)).shape == (2, 3)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="arch='resnet'"):
        build_model("resnet", {"num_classes": 2})
    with pytest.raises(VolumetricError, match="model.arch"):
        load_config(None, ["--model.arch=resnet"])


@pytest.mark.slow
def test_densenet_trains_and_infers_from_the_cli(tiny_dataset_shared, tmp_path):
    config = {
        **TINY_CONFIG,
        "model": {**TINY_CONFIG["model"], "arch": "densenet121"},
        "data": {**TINY_CONFIG["data"], "target_shape": [32, 32, 32]},
        "train": {**TINY_CONFIG["train"], "epochs": 1},
    }
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, write_config(tmp_path / "dense.yaml", config)) == 0
    state = load_checkpoint(run / "last.pt")
    assert state.arch == "densenet121"
    assert state.model_args == {"num_classes": 2, "in_channels": 1, "dropout": 0.0}
    assert not isinstance(state.build_model(), VolumeTransformer)
    scan = sorted((tiny_dataset_shared / "lesion").iterdir())[0]
    assert (
        infer_main(
            [str(run / "last.pt"), str(scan), "--output", str(tmp_path / "p.csv"), "--no-progress"]
        )
        == 0
    )
    _, rows = read_csv(tmp_path / "p.csv")
    assert rows[0]["error"] == "" and rows[0]["prediction"] in ("healthy", "lesion")


# ------------------------------------------------------------------ every registered architecture

SMALL = {  # model-section settings small enough for a test (each spec takes the keys it knows)
    "patch_size": 4,
    "embed_dim": 24,
    "depth": 1,
    "num_heads": 2,
    "in_channels": 1,
}


@pytest.mark.slow  # DenseNet's export traces for about 20 s
@pytest.mark.parametrize("name", sorted(architectures()))
def test_every_registered_architecture(name, tmp_path):
    """As timm's test_models: forward shapes on two grids, the head's prefix in the state dict,
    save → load → predict identical, and export where the spec says it is supported."""
    spec = architecture(name)
    args = spec.arguments(SMALL, num_classes=3)
    torch.manual_seed(0)
    model = spec.build(**args).eval()
    with torch.no_grad():
        for grid in [(32, 32, 32), (64, 48, 32)]:
            assert model(torch.randn(2, 1, *grid)).shape == (2, 3), grid
    assert any(key.startswith(spec.head_prefix) for key in model.state_dict())
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        model=model,
        arch=name,
        model_args=args,
        class_names=["a", "b", "c"],
        preprocessing={"patch_size": 4, "spacing": None, "target_shape": None},
        config={},
    )
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).build_model()(x), model(x))
    if spec.export:
        from volumetric.export import export_model

        written = export_model(path, tmp_path / "model.pt2", fmt="pt2")
        program = torch.export.load(written[0]).module()
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x).softmax(1), rtol=0, atol=1e-4)


def test_a_checkpoint_of_an_architecture_not_installed_is_one_line(tmp_path, capsys):
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        model=torch.nn.Linear(2, 2),
        arch="resnet18_3d",
        model_args={"num_classes": 2},
        class_names=["a", "b"],
        preprocessing={"patch_size": 4},
        config={},
    )
    scan = tmp_path / "s.nii.gz"
    write_scan(scan, np.zeros((8, 8, 8), np.float32))
    assert infer_main([str(path), str(scan), "--output", str(tmp_path / "p.csv")]) == 2
    assert_one_line_error(capsys, "volumetric-infer", "arch='resnet18_3d' is not installed")


def test_densenet_on_inputs_its_last_batchnorm_cannot_normalize_is_one_line(
    tiny_dataset_shared, tmp_path, capsys
):
    """Batch 1 (the defaults' native grids) on 16³ scans: the last feature map is one voxel; a
    config error naming the batch size, before any training step."""
    config = {
        **TINY_CONFIG,
        "model": {**TINY_CONFIG["model"], "arch": "densenet121"},
        "data": {**TINY_CONFIG["data"], "target_shape": [32, 32, 32]},
        "train": {**TINY_CONFIG["train"], "epochs": 1, "batch_size": 1},
    }
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, write_config(tmp_path / "dense.yaml", config)) == 2
    line = assert_one_line_error(
        capsys, "volumetric-train", "model.arch=densenet121", "train.batch_size"
    )
    assert "internal error" not in line
    assert not (run / "last.pt").exists()


@pytest.mark.parametrize(
    "sizes,shape,ok",
    [
        ({1}, (32, 32, 32), False),  # one voxel, one scan
        ({2}, (32, 32, 32), True),
        ({8, 1}, (32, 32, 32), False),  # the epoch's last batch holds one scan
        ({1}, (64, 32, 32), True),  # two voxels
        ({4}, (16, 64, 64), False),  # too small on one axis: nothing left of it
    ],
)
def test_densenet_input_check(sizes, shape, ok):
    check = architecture("densenet121").check_input
    if ok:
        check(sizes, shape)
    else:
        with pytest.raises(ValueError):
            check(sizes, shape)


ENTRY_POINT_PACKAGE = """
import torch
from torch import nn
from volumetric.models.registry import ArchitectureSpec


class TinyNet(nn.Module):
    def __init__(self, *, num_classes, in_channels=1):
        super().__init__()
        self.body = nn.Conv3d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3, 4)))


TINYNET = ArchitectureSpec(name="tinynet", build=TinyNet, head_prefix="fc.")
"""


@pytest.mark.slow  # trains, then two processes
def test_an_architecture_registered_from_outside_trains_and_infers(tiny_dataset_shared, tmp_path):
    """A user's nn.Module, in a package of their own with a volumetric.architectures entry point
    (the package is not edited): training in this process finds it, and volumetric-infer in a
    new process finds it too."""
    site = tmp_path / "site"
    (site / "tinynet_pkg").mkdir(parents=True)
    (site / "tinynet_pkg" / "__init__.py").write_text(ENTRY_POINT_PACKAGE)
    info = site / "tinynet_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinynet-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[volumetric.architectures]\ntinynet = tinynet_pkg:TINYNET\n"
    )
    sys.path.insert(0, str(site))
    architectures.cache_clear()
    try:
        config = {
            **TINY_CONFIG,
            "model": {"arch": "tinynet"},
            "train": {**TINY_CONFIG["train"], "epochs": 1},
        }
        run = tmp_path / "run"
        assert train(tiny_dataset_shared, run, write_config(tmp_path / "t.yaml", config)) == 0
        assert load_checkpoint(run / "best.pt").arch == "tinynet"
    finally:
        sys.path.remove(str(site))
        architectures.cache_clear()
    scan = sorted((tiny_dataset_shared / "lesion").iterdir())[0]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    infer = shutil.which("volumetric-infer") or "volumetric-infer"
    done = subprocess.run(
        [
            infer,
            str(run / "best.pt"),
            str(scan),
            "--output",
            str(tmp_path / "p.csv"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    _, rows = read_csv(tmp_path / "p.csv")
    assert rows[0]["error"] == "" and rows[0]["prediction"] in ("healthy", "lesion")
    # without the plug-in on the path, the same file is one clear line
    plain = subprocess.run(
        [infer, str(run / "best.pt"), str(scan), "--output", str(tmp_path / "q.csv")],
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 2 and "arch='tinynet' is not installed" in plain.stderr

"""Architectures by name: the seq-norm ViT and MONAI's DenseNet121 baseline train and infer alike."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIG, read_csv, train, write_config

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import infer_main
from volumetric.config import Config, load_config
from volumetric.errors import VolumetricError
from volumetric.models.registry import build_model, model_arguments
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

"""Fine-tuning: --init copies a checkpoint's weights (a fresh head for other classes), and
train.freeze_blocks keeps the patch embedding and the first blocks as they were."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_one_line_error, train, weights, write_config

from volumetric.checkpoint import load_checkpoint, save_checkpoint
from volumetric.config import load_config
from volumetric.engine.finetune import freeze_blocks, load_initial_weights
from volumetric.errors import ConfigError, VolumetricError
from volumetric.models.vit3d import VolumeTransformer

ARGS = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2)


def saved_model(path, classes=("healthy", "lesion"), **changes):
    torch.manual_seed(1)
    args = {**ARGS, "num_classes": len(classes), **changes}
    model = VolumeTransformer(**args)
    save_checkpoint(
        path,
        model=model,
        model_args=args,
        class_names=list(classes),
        preprocessing={"patch_size": 4},
        config={},
    )
    return model


@pytest.mark.parametrize("classes", [("healthy", "lesion"), ("a", "b", "c")])
def test_init_copies_every_weight_and_resets_the_head_for_other_classes(tmp_path, classes):
    source = saved_model(tmp_path / "init.pt").state_dict()
    torch.manual_seed(2)
    model = VolumeTransformer(**ARGS, num_classes=len(classes))
    fresh_head = model.head.weight.detach().clone()
    checkpoint = load_checkpoint(tmp_path / "init.pt")
    load_initial_weights(model, "vit3d", list(classes), checkpoint, tmp_path / "init.pt")
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            continue
        assert torch.equal(value, source[key]), key
    if len(classes) == 2:  # the same classes: the head is the checkpoint's
        assert torch.equal(model.head.weight, source["head.weight"])
    else:
        assert torch.equal(model.head.weight, fresh_head)


def test_init_refuses_a_model_of_another_shape_or_kind(tmp_path):
    saved_model(tmp_path / "wide.pt", embed_dim=32)
    checkpoint = load_checkpoint(tmp_path / "wide.pt")
    model = VolumeTransformer(**ARGS, num_classes=2)
    with pytest.raises(
        VolumetricError, match=r"wide\.pt: .* does not fit .*\(32, 1, 4, 4, 4\) there"
    ):
        load_initial_weights(
            model, "vit3d", ["healthy", "lesion"], checkpoint, tmp_path / "wide.pt"
        )
    with pytest.raises(VolumetricError, match="is a vit3d model, this run trains densenet121"):
        load_initial_weights(model, "densenet121", ["a", "b"], checkpoint, tmp_path / "wide.pt")


def test_freeze_blocks_stops_gradients_of_embedding_and_first_blocks():
    model = VolumeTransformer(**ARGS, num_classes=2)
    freeze_blocks(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.named_parameters() if n.startswith(("patch_embed.", "blocks.0."))
    }
    with pytest.raises(VolumetricError, match="has 2 blocks"):
        freeze_blocks(VolumeTransformer(**ARGS, num_classes=2), 3)


def test_freeze_blocks_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="exceeds model.depth=6"):
        load_config(None, ["--train.freeze_blocks=7"])
    with pytest.raises(ConfigError, match="vit3d"):
        load_config(None, ["--train.freeze_blocks=1", "--model.arch=densenet121"])


def test_fine_tuning_run_keeps_frozen_weights_and_trains_the_rest(
    tmp_path, tiny_dataset, trained_run
):
    data = tmp_path / "other"  # another task: other class names, so a new head
    shutil.copytree(tiny_dataset / "healthy", data / "normal")
    shutil.copytree(tiny_dataset / "lesion", data / "abnormal")
    init = trained_run / "best.pt"
    config = write_config(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    extra = ["--init", str(init), "--train.freeze_blocks=1", "--train.epochs=1"]
    assert train(data, run, config, *extra) == 0
    before, after = weights(init), weights(run / "last.pt")
    for key in after:
        if key.startswith(("patch_embed.", "blocks.0.")):
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.weight"])
    assert load_checkpoint(run / "last.pt").config["train"]["init"] == str(init)


def test_a_missing_init_checkpoint_is_one_line_before_anything_is_written(
    tmp_path, tiny_dataset, capsys
):
    run = tmp_path / "run"
    code = train(tiny_dataset, run, write_config(tmp_path / "t.yaml"), "--init", "nope.pt")
    assert code == 2
    assert_one_line_error(capsys, "volumetric-train", "nope.pt: checkpoint not found")
    assert not run.exists()


def test_a_null_form_option_takes_the_init_checkpoints_value():
    """``attention_norm: null`` (the kind's default, as configs/default.yaml writes it) is not a
    choice that contradicts the checkpoint: a run from a plain-form model keeps the plain form;
    an explicit value that differs is the one-line error."""
    from types import SimpleNamespace

    from volumetric.engine.finetune import model_section_from_init

    init = SimpleNamespace(
        path="p.pt",
        arch="vit3d",
        model_args={"attention": "seqnorm", "attention_norm": False, "seqnorm_affine": False},
    )
    section = model_section_from_init({"attention_norm": None, "seqnorm_affine": None}, init)
    assert section["attention_norm"] is False and section["seqnorm_affine"] is False
    with pytest.raises(VolumetricError, match="attention_norm"):
        model_section_from_init({"attention_norm": True}, init)

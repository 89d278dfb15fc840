"""Checkpoints are untrusted input: weights-only loading, a refused payload, format and model checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import assert_matches_stored

from volumetric.checkpoint import (
    FORMAT_VERSION,
    VIT_OPTIONS_BEFORE_V4,
    load_checkpoint,
    save_checkpoint,
)
from volumetric.errors import VolumetricError
from volumetric.models.registry import model_arguments
from volumetric.models.vit3d import VolumeTransformer

MODEL_ARGS = dict(num_classes=2, patch_size=4, embed_dim=24, depth=1, num_heads=2)


def good_checkpoint(path: Path) -> Path:
    save_checkpoint(
        path,
        model=VolumeTransformer(**MODEL_ARGS),
        model_args=MODEL_ARGS,
        class_names=["a", "b"],
        preprocessing={"patch_size": 4},
        config={},
    )
    return path


class Payload:
    """Unpickling this object would call os.mkdir(marker): code execution from a .pt file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_round_trip_and_format_version(tmp_path):
    state = load_checkpoint(good_checkpoint(tmp_path / "a.pt"))
    assert state.format_version == FORMAT_VERSION
    model = state.build_model()
    assert not model.training and model.head.out_features == 2


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    checkpoint = torch.load(good_checkpoint(tmp_path / "good.pt"), weights_only=True)
    checkpoint["config"] = {"note": Payload(marker)}
    torch.save(checkpoint, evil)
    with pytest.raises(VolumetricError, match="evil.pt: refused to load checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file loaded the unsafe way does run the payload: the test above is not vacuous
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_other_format_version_is_a_clear_error(tmp_path):
    path = good_checkpoint(tmp_path / "a.pt")
    state = torch.load(path, weights_only=True)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(
        VolumetricError, match=f"format version {FORMAT_VERSION + 1} is not supported"
    ):
        load_checkpoint(path)


@pytest.mark.parametrize("change", ["other-architecture", "missing-weights"])
def test_weights_of_another_model_are_a_clear_error(change, tmp_path):
    path = good_checkpoint(tmp_path / "a.pt")
    state = load_checkpoint(path)
    if change == "other-architecture":
        state.model_args = {**MODEL_ARGS, "depth": 2}
    else:
        state.weights.pop("head.weight")
    with pytest.raises(VolumetricError, match="weights do not fit"):
        state.build_model()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated zip", b"\x80\x04not a pickle"],
    ids=["empty", "zip", "pickle"],
)
def test_unreadable_checkpoint(content, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(VolumetricError, match="broken.pt"):
        load_checkpoint(path)


# ------------------------------------------------------------------------- format versions

V1 = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def test_version_1_file_is_upgraded_when_read():
    """A best.pt written by format version 1 (tests/fixtures/checkpoint_v1/README.md): arch moves
    out of model_args, the optimizer state it carried moves under 'training'."""
    raw = torch.load(V1 / "best.pt", weights_only=True)
    assert raw["format_version"] == 1 and "optimizer" in raw  # what the fixture really holds
    state = load_checkpoint(V1 / "best.pt")
    assert state.format_version == FORMAT_VERSION == 5
    assert state.arch == "vit3d" and "arch" not in state.model_args
    # "seqnorm" meant Q and K normalized then: that form is seqnorm_qk now
    assert raw["model_args"]["attention"] == "seqnorm"
    assert state.model_args["attention"] == state.config["model"]["attention"] == "seqnorm_qk"
    assert "optimizer" in state.training
    VolumeTransformer(**state.model_args)  # exactly the constructor's arguments
    assert state.metrics["epoch"] == state.epoch


@pytest.mark.parametrize("tta", [0, 2])
def test_version_1_file_predicts_as_it_did(tta):
    """The probabilities recorded when the fixture was made (on another CPU), with and without
    TTA: equal up to float32 rounding."""
    import json

    from volumetric.inference import Predictor

    expected = json.loads((V1 / "expected.json").read_text())
    predictor = Predictor(V1 / "best.pt", device="cpu", tta=tta, seed=3)
    for name in ("lesion.nii.gz", "healthy.nii.gz"):
        result = predictor(V1 / name)
        want = expected[f"{name}|tta={tta}"]
        for field in ("probs", "probs_std"):
            assert_matches_stored(
                getattr(result, field), want[field], "float32 probabilities", f"{name} {field}"
            )


def test_best_holds_no_optimizer_and_last_resumes(tmp_path):
    """best.pt: weights and what inference needs; last.pt: plus the training state."""
    model = VolumeTransformer(**MODEL_ARGS)
    meta = dict(model_args=MODEL_ARGS, class_names=["a", "b"], preprocessing={"patch_size": 4})
    save_checkpoint(tmp_path / "best.pt", model=model, config={}, epoch=3, **meta)
    training = {"optimizer": {"state": {}, "param_groups": []}, "step": 7}
    save_checkpoint(
        tmp_path / "last.pt", model=model, config={}, epoch=3, training=training, **meta
    )
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best.training is None and last.training is not None
    assert last.training["step"] == 7 and best.epoch == last.epoch == 3


def format_2_checkpoint(
    path: Path, model_args: dict, model: torch.nn.Module, format_version: int = 2, **extra
) -> Path:
    """A best.pt as format version 2 (or 3, the same layout) wrote it: arch beside model_args, no
    training state."""
    content = {
        "format": "volumetric-checkpoint",
        "format_version": format_version,
        "volumetric_version": "0.2.0",
        "arch": "vit3d",
        "model_args": model_args,
        "class_names": ["healthy", "lesion"],
        "preprocessing": {"patch_size": 4},
        "config": {"model": {k: v for k, v in model_args.items() if k != "num_classes"}},
        "model": model.state_dict(),
        "epoch": 1,
        "metrics": {},
        **extra,
    }
    torch.save(content, path)
    return path


def written_as(version: int, tmp_path: Path, args: dict, model: torch.nn.Module):
    """``model`` (eval, head sharpened so that a changed model shows in its probabilities) saved
    as a file of format ``version`` with ``args``: (path, an input, the probabilities it gave)."""
    model.eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    path = format_2_checkpoint(tmp_path / "best.pt", args, model, format_version=version)
    x = torch.randn(2, 1, 16, 12, 8)
    with torch.no_grad():
        return path, x, model(x).softmax(-1)


@pytest.mark.parametrize("named", [True, False], ids=["seqnorm", "default"])
def test_version_2_seqnorm_loads_as_seqnorm_qk_and_predicts_as_before(named, tmp_path):
    """Format 2 files saying attention "seqnorm" (or nothing, the default) hold a model whose
    attention normalized Q and K only: they load as seqnorm_qk and give the same probabilities,
    bit for bit, as that model gave before saving."""
    torch.manual_seed(7)
    args = {**MODEL_ARGS, "depth": 2, "pool": "max"}
    before = VolumeTransformer(**args, attention="seqnorm_qk").eval()  # the format-2 "seqnorm"
    with torch.no_grad():  # probabilities away from 0.5: a changed attention would show
        before.head.weight.mul_(20.0)
    saved_args = {**args, "attention": "seqnorm"} if named else dict(args)
    path = format_2_checkpoint(tmp_path / "best.pt", saved_args, before)
    x = torch.randn(3, 1, 16, 12, 8)
    with torch.no_grad():
        expected = before(x).softmax(-1)

    state = load_checkpoint(path)
    assert state.format_version == FORMAT_VERSION
    assert state.model_args["attention"] == "seqnorm_qk"
    if named:  # the resolved config of the run says the same
        assert state.config["model"]["attention"] == "seqnorm_qk"
    model = state.build_model()
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert torch.equal(probs, expected)
    # not vacuous: the same weights under today's seqnorm (V normalized too) predict otherwise
    today = VolumeTransformer(**args, attention="seqnorm", attention_norm=False).eval()
    today.load_state_dict(state.weights)
    with torch.no_grad():
        assert not torch.allclose(today(x).softmax(-1), expected, atol=1e-4)


def test_version_2_other_attention_kinds_are_kept(tmp_path):
    model = VolumeTransformer(**MODEL_ARGS, attention="softmax")
    path = format_2_checkpoint(tmp_path / "best.pt", {**MODEL_ARGS, "attention": "softmax"}, model)
    state = load_checkpoint(path)
    assert state.model_args["attention"] == state.config["model"]["attention"] == "softmax"
    state.build_model()


def test_new_checkpoints_keep_seqnorm_and_the_affine(tmp_path):
    """Format 3 files are not upgraded: seqnorm stays the Q, K, V form, with its affine."""
    args = {**MODEL_ARGS, "attention": "seqnorm", "seqnorm_affine": True}
    model = VolumeTransformer(**args)
    save_checkpoint(
        tmp_path / "a.pt",
        model=model,
        model_args=args,
        class_names=["a", "b"],
        preprocessing={"patch_size": 4},
        config={"model": {"attention": "seqnorm", "seqnorm_affine": True}},
    )
    state = load_checkpoint(tmp_path / "a.pt")
    assert state.model_args == args and state.config["model"]["attention"] == "seqnorm"
    rebuilt = state.build_model()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


@pytest.mark.parametrize("with_affine_key", [True, False])
def test_version_3_file_keeps_its_options_off_whatever_the_defaults(with_affine_key, tmp_path):
    """Format 3 files were written before LayerScale, the attention norm, the conv stem and drop
    path existed (and some before seqnorm_affine): they load with each of them off, written out,
    and predict exactly as the model that was saved, whatever today's defaults are."""
    torch.manual_seed(9)
    args = {**MODEL_ARGS, "depth": 2, "pool": "max", "attention": "seqnorm"}
    if with_affine_key:
        args["seqnorm_affine"] = False
    before = VolumeTransformer(**{**VIT_OPTIONS_BEFORE_V4, **args}).eval()
    path, x, expected = written_as(3, tmp_path, args, before)
    state = load_checkpoint(path)
    assert state.format_version == FORMAT_VERSION == 5
    for key, value in VIT_OPTIONS_BEFORE_V4.items():
        assert state.model_args[key] == value, key
        assert state.config["model"][key] == value, key
    with torch.no_grad():
        assert torch.equal(state.build_model()(x).softmax(-1), expected)


def test_version_3_densenet_is_left_as_it_was(tmp_path):
    content = torch.load(good_checkpoint(tmp_path / "v.pt"), weights_only=True)
    content.update(format_version=3, arch="densenet121", model_args={"num_classes": 2})
    torch.save(content, tmp_path / "d.pt")
    assert load_checkpoint(tmp_path / "d.pt").model_args == {"num_classes": 2}


def test_version_4_file_of_the_plain_form_keeps_it_after_the_default_changed(tmp_path):
    """Format 4 files written before the output norm became seqnorm's default say
    attention_norm=False: they rebuild without it and predict exactly as saved, while a model
    configured today records the norm explicitly."""
    torch.manual_seed(5)
    args = {**MODEL_ARGS, "depth": 2, "pool": "max", "attention": "seqnorm"}
    args.update(seqnorm_affine=False, layer_scale=None, attention_norm=False)
    args.update(stem="patch", drop_path=0.0)
    before = VolumeTransformer(**args).eval()
    path, x, expected = written_as(4, tmp_path, args, before)
    model = load_checkpoint(path).build_model()
    assert not any("out_norm" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x).softmax(-1), expected)
    today = model_arguments("vit3d", {"attention": "seqnorm"}, 2)
    assert today["attention_norm"] is True and today["seqnorm_affine"] is False


def test_version_4_conv_stem_keeps_its_channel_norm(tmp_path):
    """Format 4 conv stems normalized each voxel over its channels; the default is now instance
    norm, whose parameters have the same names and shapes: the file must say which it was, and
    it rebuilds with the channel norm and predicts exactly as saved."""
    torch.manual_seed(6)
    args = {**MODEL_ARGS, "depth": 2, "pool": "max", "attention": "seqnorm"}
    args.update(seqnorm_affine=False, layer_scale=None, attention_norm=True)
    args.update(stem="conv", drop_path=0.0)
    before = VolumeTransformer(**args, stem_norm="channel").eval()
    path, x, expected = written_as(4, tmp_path, args, before)
    state = load_checkpoint(path)
    assert state.model_args["stem_norm"] == state.config["model"]["stem_norm"] == "channel"
    with torch.no_grad():
        assert torch.equal(state.build_model()(x).softmax(-1), expected)
    # not vacuous: the same weights load into today's default stem and predict otherwise
    today = VolumeTransformer(**args).eval()
    today.load_state_dict(state.weights)
    with torch.no_grad():
        assert not torch.allclose(today(x).softmax(-1), expected, atol=1e-4)
    assert model_arguments("vit3d", {"stem": "conv"}, 2)["stem_norm"] == "instance"

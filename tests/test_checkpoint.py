"""Checkpoints are untrusted input: weights-only loading, a refused payload, format and model checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from volumetric.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from volumetric.errors import VolumetricError
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
    assert state["format_version"] == FORMAT_VERSION
    model = model_from_checkpoint(state)
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
        state["model_args"] = {**MODEL_ARGS, "depth": 2}
    else:
        state["model"].pop("head.weight")
    with pytest.raises(VolumetricError, match="weights do not fit"):
        model_from_checkpoint(state, path)


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
    assert state["format_version"] == FORMAT_VERSION == 2
    assert state["arch"] == "vit3d" and "arch" not in state["model_args"]
    assert "optimizer" not in state and "optimizer" in state["training"]
    VolumeTransformer(**state["model_args"])  # exactly the constructor's arguments
    assert state["metrics"]["epoch"] == state["epoch"]


@pytest.mark.parametrize("tta", [0, 2])
def test_version_1_file_predicts_as_it_did(tta):
    """The probabilities recorded when the fixture was made, with and without TTA."""
    import json

    from volumetric.inference import Predictor

    expected = json.loads((V1 / "expected.json").read_text())
    predictor = Predictor(V1 / "best.pt", device="cpu", tta=tta, seed=3)
    for name in ("lesion.nii.gz", "healthy.nii.gz"):
        result = predictor(V1 / name)
        want = expected[f"{name}|tta={tta}"]
        assert result.probs == want["probs"]  # identical, not merely close
        assert result.probs_std == want["probs_std"]


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
    assert "training" not in best and "optimizer" not in best
    assert last["training"]["step"] == 7 and best["epoch"] == last["epoch"] == 3

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

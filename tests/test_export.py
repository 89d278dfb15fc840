"""Export to ONNX and torch.export: the graphs agree with the checkpoint's model on batches and grids
not seen at export, the plain attention agrees with the production one, and the reference pair
written beside the model reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volumetric.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from volumetric.data.dataset import preprocess_scan, read_scan
from volumetric.errors import VolumetricError
from volumetric.export import export_model
from volumetric.layers.attention_functional import (
    seqnorm_attention_plain,
    seqnorm_attention_reference,
)
from volumetric.layers.seqnorm_kernel import seqnorm_attention
from volumetric.models.vit3d import VolumeTransformer
from volumetric.transforms import build_preprocessing

MODEL_ARGS = {
    "num_classes": 2,
    "patch_size": 4,
    "embed_dim": 24,
    "depth": 2,
    "num_heads": 2,
    "pool": "max",
}
PREPROCESSING = {
    "spacing": 1.5,
    "target_shape": None,
    "intensity": "zscore",
    "ct_window": [-1000.0, 1000.0],
    "canonical": True,
    "patch_size": 4,
}
# a batch of two at the traced size's neighbours, and grids the export never saw
VOLUMES = [(2, 1, 16, 16, 16), (2, 1, 24, 20, 16), (1, 1, 32, 16, 28), (3, 1, 8, 4, 12)]
TOLERANCE = 1e-4


def write_checkpoint(path: Path, model_args: dict) -> Path:
    torch.manual_seed(0)
    model = VolumeTransformer(**model_args)
    with torch.no_grad():  # probabilities away from 0.5 but not saturated: differences show
        model.head.weight.mul_(3.0)
    save_checkpoint(
        path,
        model=model,
        arch="vit3d",
        model_args=model_args,
        class_names=["healthy", "lesion"],
        preprocessing=PREPROCESSING,
        config={},
        epoch=1,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("export") / "best.pt", MODEL_ARGS)


@pytest.fixture(scope="module")
def exported(checkpoint) -> dict[str, list[Path]]:
    """Both formats exported once: tracing is the slow part."""
    return {
        fmt: export_model(checkpoint, checkpoint.parent / f"model.{fmt}", fmt=fmt)
        for fmt in ("onnx", "pt2")
    }


def model_probabilities(checkpoint: Path, volume: torch.Tensor) -> np.ndarray:
    model = load_checkpoint(checkpoint).build_model()
    with torch.no_grad():
        return model(volume).softmax(dim=1).numpy()  # (B, K)


def volumes() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator) * 2.0 + 0.5 for shape in VOLUMES]


@pytest.mark.slow  # shares the exports (about 15 s of tracing)
def test_onnx_matches_the_checkpoint_on_unseen_batches_and_grids(checkpoint, exported):
    ort = pytest.importorskip("onnxruntime")
    path = exported["onnx"][0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["volume"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    seen = []
    for volume in volumes():
        (probs,) = session.run(None, {"volume": volume.numpy()})
        expected = model_probabilities(checkpoint, volume)
        assert probs.shape == expected.shape
        assert np.abs(probs - expected).max() < TOLERANCE, volume.shape
        seen.append(expected[:, 0])
    assert np.ptp(np.concatenate(seen)) > 100 * TOLERANCE  # the comparison can tell inputs apart


@pytest.mark.slow  # shares the exports (about 15 s of tracing)
def test_pt2_matches_the_checkpoint_on_unseen_batches_and_grids(checkpoint, exported):
    program = torch.export.load(exported["pt2"][0]).module()
    for volume in volumes():
        with torch.no_grad():
            probs = program(volume).numpy()
        expected = model_probabilities(checkpoint, volume)
        assert probs.shape == expected.shape
        assert np.abs(probs - expected).max() < TOLERANCE, volume.shape


@pytest.mark.slow  # shares the exports (about 15 s of tracing)
def test_description_and_reference_pair(checkpoint, exported):
    files = exported["onnx"]
    assert [f.name for f in files] == [
        "model.onnx",
        "model.preprocessing.json",
        "model.reference_input.nii.gz",
        "model.reference_tensor.npy",
        "model.reference_probabilities.npy",
    ]
    assert all(f.is_file() for f in files)
    assert not list(checkpoint.parent.glob(".*.tmp"))  # no temporary left behind
    description = json.loads(files[1].read_text())
    assert description["class_names"] == ["healthy", "lesion"]
    assert (
        description["arch"] == "vit3d"
        and description["checkpoint_format_version"] == FORMAT_VERSION
    )
    assert description["preprocessing"] == PREPROCESSING
    assert (
        description["input"]["name"] == "volume"
        and description["output"]["name"] == "probabilities"
    )
    assert len(description["preprocessing_steps"]) == 7
    assert description["reference"]["tensor"] == "model.reference_tensor.npy"

    settings = load_checkpoint(checkpoint).preprocessing
    preprocess = build_preprocessing(settings, settings["patch_size"])
    subject = preprocess_scan(files[2], read_scan(files[2]), preprocess)
    fresh = subject.image.data.float().numpy()  # (C, W, H, D)
    tensor = np.load(files[3])
    assert tensor.dtype == np.float32 and tensor.shape == fresh.shape
    assert np.array_equal(tensor, fresh)
    assert tensor.shape[1:] != read_scan(files[2]).spatial_shape  # resampled and padded
    probabilities = np.load(files[4])
    expected = model_probabilities(checkpoint, torch.from_numpy(tensor)[None])
    assert np.abs(probabilities - expected).max() < 1e-6


@pytest.mark.slow  # two exports of their own (about 15 s of tracing)
def test_every_model_option_exports(tmp_path):
    """The conv stem, LayerScale, the attention norm, the affine and drop path (inactive at
    inference) trace into both formats, which agree with the checkpoint on unseen grids."""
    options = dict(stem="conv", layer_scale=0.1, attention_norm=True, seqnorm_affine=True)
    checkpoint = write_checkpoint(tmp_path / "best.pt", {**MODEL_ARGS, **options, "drop_path": 0.1})
    ort = pytest.importorskip("onnxruntime")
    onnx = export_model(checkpoint, tmp_path / "model.onnx", fmt="onnx")[0]
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    program = torch.export.load(export_model(checkpoint, tmp_path / "m.pt2", fmt="pt2")[0]).module()
    for volume in volumes()[1:3]:
        expected = model_probabilities(checkpoint, volume)
        (from_onnx,) = session.run(None, {"volume": volume.numpy()})
        with torch.no_grad():
            from_pt2 = program(volume).numpy()
        assert np.abs(from_onnx - expected).max() < TOLERANCE, volume.shape
        assert np.abs(from_pt2 - expected).max() < TOLERANCE, volume.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_attention_equals_the_production_and_reference_paths(dtype):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=generator, dtype=dtype) for _ in range(3))
    k = k * 4.0 + 100.0  # an ill-conditioned K: the production path takes its exact branch
    plain = seqnorm_attention_plain(q, k, v)
    assert plain.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(plain, seqnorm_attention_reference(q, k, v), rtol=0, atol=tolerance)
    torch.testing.assert_close(
        plain.float(), seqnorm_attention(q, k, v).float(), rtol=0, atol=1e-5
    )  # the production path computes in float32 whatever the input


def test_user_mistakes_are_volumetric_errors(checkpoint, tmp_path):
    with pytest.raises(VolumetricError, match="checkpoint not found"):
        export_model(tmp_path / "missing.pt", tmp_path / "model.onnx", fmt="onnx")
    with pytest.raises(VolumetricError, match="format"):
        export_model(checkpoint, tmp_path / "model.tflite", fmt="tflite")
    with pytest.raises(VolumetricError, match=r"ending in \.pt2"):
        export_model(checkpoint, tmp_path / "model.onnx", fmt="pt2")
    with pytest.raises(VolumetricError, match="opset"):
        export_model(checkpoint, tmp_path / "model.onnx", fmt="onnx", opset=7)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(VolumetricError, match="cannot be written"):
        export_model(checkpoint, blocker / "model.pt2", fmt="pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

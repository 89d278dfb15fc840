"""The Python API: load_model and Predictor on paths, arrays with an affine and TorchIO images;
errors raised to a library caller, error rows for the command line."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from volumetric import LoadedModel, Predictor, VolumeTransformer, load_model
from volumetric.errors import VolumetricError
from volumetric.inference import PredictionError, predict_to_csv

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_v1"
CHECKPOINT, SCAN = FIXTURES / "best.pt", FIXTURES / "lesion.nii.gz"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(CHECKPOINT, device="cpu")


def test_load_model_gives_the_model_classes_and_preprocessing(loaded):
    assert isinstance(loaded.model, VolumeTransformer) and not loaded.model.training
    assert loaded.class_names == ["healthy", "lesion"] and loaded.arch == "vit3d"
    assert loaded.in_channels == 1 and loaded.settings["patch_size"] == 4
    subject = loaded.preprocess(tio.ScalarImage(SCAN))
    assert subject.image.data.shape == (1, 16, 16, 16)  # the checkpoint's target_shape
    probs = loaded.probabilities(subject.image.data[None].float())  # (1, 2)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(), torch.tensor(1.0))


def test_path_array_and_image_give_the_same_probabilities(loaded):
    predictor = Predictor(loaded)
    from_path = predictor(SCAN)
    image = nib.load(str(SCAN))
    array = np.asarray(image.get_fdata(dtype=np.float32))  # (W, H, D)
    from_array = predictor(array, affine=image.affine)
    from_tensor = predictor(torch.from_numpy(array)[None], affine=image.affine)  # (1, W, H, D)
    from_image = predictor(tio.ScalarImage(SCAN))
    assert from_path.probs == from_array.probs == from_tensor.probs == from_image.probs
    assert from_path.source == str(SCAN) and from_array.source == "array"
    assert from_path.prediction == loaded.class_names[int(np.argmax(from_path.probs))]


def test_library_callers_get_exceptions(loaded, tmp_path):
    predictor = Predictor(loaded)
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not a scan")
    with pytest.raises(VolumetricError, match="broken.nii.gz: cannot read scan"):
        predictor(broken)
    with pytest.raises(VolumetricError, match="needs its affine"):
        predictor(np.zeros((8, 8, 8)))
    with pytest.raises(VolumetricError, match=r"must be \(W, H, D\)"):
        predictor(np.zeros((8, 8)), affine=np.eye(4))
    nan = np.ones((8, 8, 8), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(VolumetricError, match="1 voxel"):
        predictor(nan, affine=np.eye(4))
    with pytest.raises(VolumetricError, match="cannot classify a dict"):
        predictor({})


def test_csv_gets_an_error_row_and_the_others_keep_theirs(loaded, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not a scan")
    output = tmp_path / "p.csv"
    results = predict_to_csv(Predictor(loaded), [SCAN, broken], output, progress=False)
    assert isinstance(results[1], PredictionError) and "cannot read scan" in results[1].reason
    assert results[1].source == str(broken)
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == [str(SCAN), str(broken)]
    assert rows[0]["error"] == "" and rows[0]["prediction"] == results[0].prediction
    assert rows[1]["prediction"] == "" and "cannot read scan" in rows[1]["error"]

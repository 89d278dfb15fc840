"""Every broken input a user can hand us gets one line naming the file and the problem, never a traceback.

Each bad scan is tried through all three commands:
- volumetric-train (the scan inside a class folder): exit status 2, nothing half-written;
- volumetric-evaluate: exit status 2;
- volumetric-infer (beside a good scan): the good scan keeps its row, the bad one gets an error row,
  exit status 1 (batch semantics: one broken scan must not cost the others their predictions).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, read_csv, train, write_config, write_scan

from volumetric.cli import evaluate_main, infer_main


def _truncated(path: Path) -> Path:
    full = write_scan(
        path.with_name("full.nii.gz"), np.random.default_rng(0).normal(size=(20, 18, 16))
    )
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text(path: Path) -> Path:
    path.write_text("patient,label\nA,lesion\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _image_2d(path: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(20, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.0, 1.0])), str(path))
    return path


def _time_series(path: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(20, 18, 16, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _nan(path: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(20, 18, 16))
    data[3, 4, 5] = np.nan
    return write_scan(path, data)


def _inf(path: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(20, 18, 16))
    data[0, 0, 0] = np.inf
    return write_scan(path, data)


def _absurd_header(path: Path) -> Path:
    """A valid small .nii whose header then claims 30000³ voxels (dim[1..3] at byte 42 of the header)."""
    plain = write_scan(path.with_suffix("").with_suffix(".raw.nii"), np.zeros((4, 4, 4)))
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    raw[42:48] = struct.pack("<3h", 30000, 30000, 30000)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _smaller_than_a_patch(path: Path) -> Path:
    return write_scan(
        path, np.random.default_rng(0).normal(size=(2, 2, 2)), spacing=(1.5, 1.5, 1.5)
    )


BAD_SCANS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated": (_truncated, "cannot read scan"),
    "text-file": (_text, "cannot read scan"),
    "empty-file": (_empty, "empty file"),
    "2d-image": (_image_2d, "not a 3D volume"),
    "4d-time-series": (_time_series, "3 channels or time points"),
    "nan-voxels": (_nan, "NaN or infinite"),
    "inf-voxels": (_inf, "NaN or infinite"),
    "absurd-header": (_absurd_header, "refusing to load"),
    "smaller-than-a-patch": (_smaller_than_a_patch, "smaller than one 4×4×4 patch"),
}


@pytest.fixture(params=sorted(BAD_SCANS), ids=sorted(BAD_SCANS))
def bad_scan(request, tmp_path) -> tuple[Path, str]:
    make, fragment = BAD_SCANS[request.param]
    (tmp_path / "bad" / "lesion").mkdir(parents=True)
    return make(tmp_path / "bad" / "lesion" / "bad.nii.gz"), fragment


@pytest.fixture
def trained_checkpoint(trained_run) -> Path:
    return trained_run / "last.pt"


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_bad_scan_in_training(bad_scan, tiny_dataset, tmp_path, capsys):
    scan, fragment = bad_scan
    shutil.copy(scan, tiny_dataset / "lesion" / "bad.nii.gz")
    run = tmp_path / "run"
    assert (
        train(tiny_dataset, run, write_config(tmp_path / "tiny.yaml"), "--train.val_fraction=0.5")
        == 2
    )
    assert_one_line_error(capsys, "volumetric-train", "bad.nii.gz", fragment)
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")] if run.exists() else []
    assert leftovers == []


def test_bad_scan_in_evaluation(bad_scan, trained_checkpoint, tmp_path, capsys):
    scan, fragment = bad_scan
    out = tmp_path / "eval"
    code = evaluate_main(
        [
            str(trained_checkpoint),
            str(scan.parent.parent),
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 2
    assert_one_line_error(capsys, "volumetric-evaluate", "bad.nii.gz", fragment)
    assert not (out / "metrics.json").exists()


def test_bad_scan_in_inference(bad_scan, trained_checkpoint, tmp_path, capsys, caplog):
    scan, fragment = bad_scan
    good = write_scan(
        tmp_path / "good.nii.gz", np.random.default_rng(1).normal(100, 10, (20, 18, 16))
    )
    output = tmp_path / "predictions.csv"
    code = infer_main(
        [str(trained_checkpoint), str(good), str(scan), "--output", str(output), "--no-progress"]
    )
    assert code == 1
    _, rows = read_csv(output)
    assert [Path(r["path"]).name for r in rows] == ["good.nii.gz", "bad.nii.gz"]
    assert rows[0]["error"] == "" and rows[0]["prediction"] in ("healthy", "lesion")
    assert (
        rows[1]["prediction"] == ""
        and fragment in rows[1]["error"]
        and "bad.nii.gz" in rows[1]["error"]
    )
    assert "Traceback" not in capsys.readouterr().err
    assert fragment in caplog.text  # the failure is also logged as it happens


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode"
)
def test_unreadable_scan(trained_checkpoint, tmp_path, capsys):
    scan = write_scan(tmp_path / "locked.nii.gz", np.zeros((8, 8, 8)))
    scan.chmod(0)
    try:
        code = infer_main(
            [
                str(trained_checkpoint),
                str(scan),
                "--output",
                str(tmp_path / "p.csv"),
                "--no-progress",
            ]
        )
    finally:
        scan.chmod(0o644)
    assert code == 1
    _, rows = read_csv(tmp_path / "p.csv")
    assert "permission denied" in rows[0]["error"]


def test_constant_volume_is_a_valid_scan(trained_checkpoint, tmp_path):
    """A constant volume (a blank scan, a phantom) is odd but not broken: z-scoring maps it to zeros,
    and the model gives finite probabilities."""
    scans = [
        write_scan(tmp_path / "s" / f"{value}.nii.gz", np.full((20, 18, 16), value))
        for value in (0.0, 1500.0)
    ]
    output = tmp_path / "p.csv"
    assert (
        infer_main(
            [str(trained_checkpoint), *map(str, scans), "--output", str(output), "--no-progress"]
        )
        == 0
    )
    _, rows = read_csv(output)
    for row in rows:
        probs = [float(row["prob_healthy"]), float(row["prob_lesion"])]
        assert all(np.isfinite(probs)) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_four_channel_scan_with_matching_model(tmp_path):
    """Several channels are handled when the model is built for them (model.in_channels)."""
    from volumetric.data.dataset import load_subject
    from volumetric.transforms import build_preprocessing

    scan = _time_series(tmp_path / "multi.nii.gz")
    pipeline = build_preprocessing(
        {"spacing": None, "target_shape": [16, 16, 16], "intensity": "zscore"}, 4
    )
    image = load_subject(scan, pipeline, in_channels=3).image.data
    assert image.shape == (3, 16, 16, 16) and torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------------- data sets


def _manifest(tmp_path: Path, dataset: Path, extra_rows: list[str]) -> Path:
    rows = (
        ["path,label"]
        + [f"{p},{p.parent.name}" for p in sorted(dataset.rglob("*.nii*"))]
        + extra_rows
    )
    path = tmp_path / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("empty-folder", "no scans found"),
        ("single-class", "at least 2 are needed"),
        ("manifest-missing-path", "does not exist"),
        ("manifest-duplicate-row", "listed twice"),
        ("val-label-not-in-training", "not among"),
    ],
)
def test_bad_data_set(case, fragment, tiny_dataset, tmp_path, capsys):
    extra: list[str] = []
    data, val = tiny_dataset, None
    if case == "empty-folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "single-class":
        shutil.rmtree(tiny_dataset / "lesion")
    elif case == "manifest-missing-path":
        data = _manifest(tmp_path, tiny_dataset, [f"{tiny_dataset}/lesion/gone.nii.gz,lesion"])
    elif case == "manifest-duplicate-row":
        first = sorted(tiny_dataset.rglob("*.nii*"))[0]
        data = _manifest(tmp_path, tiny_dataset, [f"{first},{first.parent.name}"])
    else:
        val = tmp_path / "val"
        write_scan(val / "tumour" / "a.nii.gz", np.zeros((16, 16, 16)))
    run = tmp_path / "run"
    extra = ["--val", str(val)] if val else []
    assert train(data, run, write_config(tmp_path / "tiny.yaml"), *extra) == 2
    assert_one_line_error(capsys, "volumetric-train", fragment)
    assert not (run / "last.pt").exists()

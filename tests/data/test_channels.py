"""Scans of several files, one per channel (e.g. T1, T2 and FLAIR of one subject): a manifest names
the image columns (data.channels); each image is read with its own header, resampled onto the
first one's grid and stacked. Training, evaluation, inference, TTA and relevance maps take it."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_CONFIG, assert_one_line_error, blob_volume, read_csv, train, write_config

from volumetric.cli import evaluate_main, infer_main
from volumetric.config import load_config
from volumetric.data.dataset import read_scan
from volumetric.data.discovery import discover
from volumetric.data.source import ScanSource
from volumetric.errors import ConfigError, VolumetricError

CHANNELS = ["t1", "t2", "flair"]


def write_image(path: Path, data: np.ndarray, spacing, origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def write_subject(root: Path, name: str, rng: np.random.Generator, lesion: bool) -> list[Path]:
    """T1 on a 20×18×16 grid of 1.5×1.5×2 mm; T2 and FLAIR on coarser grids of the same extent
    (10×9×8 of 3×3×4 mm, 15×12×16 of 2×2.25×2 mm). The lesion shows in T2 only."""
    t1 = write_image(
        root / f"{name}_t1.nii.gz", blob_volume(rng, (20, 18, 16), False), (1.5, 1.5, 2)
    )
    t2 = write_image(root / f"{name}_t2.nii.gz", blob_volume(rng, (10, 9, 8), lesion), (3, 3, 4))
    flair = write_image(
        root / f"{name}_flair.nii.gz", blob_volume(rng, (15, 12, 16), False), (2, 2.25, 2)
    )
    return [t1, t2, flair]


def write_manifest(path: Path, rows: list[tuple[list[Path], str]], labelled: bool = True) -> Path:
    header = [*CHANNELS, *(["label"] if labelled else [])]
    lines = [",".join(header)]
    for images, label in rows:
        names = [str(p.relative_to(path.parent)) for p in images]
        lines.append(",".join([*names, *([label] if labelled else [])]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> tuple[Path, list[tuple[list[Path], str]]]:
    root = tmp_path_factory.mktemp("mri")
    rng = np.random.default_rng(0)
    classes = [("healthy", False), ("lesion", True)] * 8
    rows = [
        (write_subject(root / "images", f"s{i:02d}", rng, lesion), label)
        for i, (label, lesion) in enumerate(classes)
    ]
    return root, rows


def test_channels_are_resampled_onto_the_first_grid_and_stacked(tmp_path):
    t1 = write_image(
        tmp_path / "t1.nii.gz", np.arange(20 * 18 * 16).reshape(20, 18, 16), (1.5, 1.5, 2)
    )
    t2 = write_image(tmp_path / "t2.nii.gz", np.full((10, 9, 8), 7.0), (3, 3, 4))
    image = read_scan(ScanSource.channels([t1, t2]))
    assert tuple(image.data.shape) == (2, 20, 18, 16)
    assert np.array_equal(image.data[0].numpy(), np.arange(20 * 18 * 16).reshape(20, 18, 16))
    interior = image.data[1, 2:-2, 2:-2, 2:-2]  # away from the border, where the grid ends
    assert np.allclose(interior.numpy(), 7.0, atol=1e-4)
    assert np.allclose(image.affine, read_scan(t1).affine)


def test_a_channel_elsewhere_in_space_is_refused(tmp_path):
    t1 = write_image(tmp_path / "t1.nii.gz", np.ones((20, 18, 16)), (1.5, 1.5, 2))
    # the same size, shifted by 60 % of the first image's width: 40 % overlap
    t2 = write_image(tmp_path / "t2.nii.gz", np.ones((20, 18, 16)), (1.5, 1.5, 2), (18.0, 0, 0))
    with pytest.raises(VolumetricError, match=r"t2\.nii\.gz: covers 40% of the first channel"):
        read_scan(ScanSource.channels([t1, t2]))
    t3 = write_image(tmp_path / "t3.nii.gz", np.ones((20, 18, 16)), (1.5, 1.5, 2), (6.0, 0, 0))
    assert read_scan(ScanSource.channels([t1, t3])).data.shape[0] == 2  # 80 %: accepted


def test_manifest_channel_columns(tmp_path, subjects):
    root, rows = subjects
    manifest = write_manifest(root / "m.csv", rows[:2])
    entries = discover(manifest, channels=CHANNELS)
    assert [len(e.source.images) for e in entries] == [3, 3]
    assert entries[0].source.path == rows[0][0][0]  # the first channel names the scan
    with pytest.raises(VolumetricError, match="missing: pd"):
        discover(manifest, channels=["t1", "pd"])
    text = manifest.read_text().splitlines()
    broken = root / "broken.csv"
    broken.write_text("\n".join([text[0], text[1].replace(rows[0][0][2].name, "gone.nii.gz")]))
    with pytest.raises(
        VolumetricError, match=r"broken\.csv:2: flair .*gone\.nii\.gz does not exist"
    ):
        discover(broken, channels=CHANNELS)


def test_channels_must_match_the_model_input():
    with pytest.raises(ConfigError, match="model.in_channels: 3"):
        load_config(None, ["--data.channels=[t1, t2, flair]"])
    with pytest.raises(ConfigError, match="not images"):
        load_config(None, ["--data.channels=[t1, label]", "--model.in_channels=2"])
    config = load_config(None, ["--data.channels=[t1, t2, flair]", "--model.in_channels=3"])
    assert config.data.channels == CHANNELS


@pytest.mark.slow
def test_train_evaluate_infer_with_three_sequences(tmp_path, subjects, capsys):
    root, rows = subjects
    manifest = write_manifest(root / "train.csv", rows)
    config = copy.deepcopy(TINY_CONFIG)
    config["data"]["channels"] = CHANNELS
    config["model"]["in_channels"] = 3
    run = tmp_path / "run"
    assert train(manifest, run, write_config(tmp_path / "c.yaml", config)) == 0

    evaluation = [str(run / "best.pt"), str(manifest), "--output-dir", str(tmp_path / "ev")]
    assert evaluate_main([*evaluation, "--no-progress"]) == 0
    _, predicted = read_csv(tmp_path / "ev" / "predictions.csv")
    assert [r["path"] for r in predicted] == [str(images[0]) for images, _ in rows]

    unlabelled = write_manifest(root / "infer.csv", rows[:3], labelled=False)
    out = tmp_path / "pred.csv"
    maps = tmp_path / "maps"
    args = [str(run / "best.pt"), str(unlabelled), "--output", str(out), "--no-progress"]
    assert infer_main([*args, "--tta", "2", "--maps", str(maps), "--map-steps", "2"]) == 0
    header, predicted = read_csv(out)
    assert "prob_std_lesion" in header
    assert [r["path"] for r in predicted] == [str(images[0]) for images, _ in rows[:3]]
    assert all(r["error"] == "" for r in predicted)
    relevance = nib.load(str(maps / "s00_t1_relevance.nii.gz"))
    assert relevance.shape == (20, 18, 16)  # the first channel's grid

    # one file given to a three-sequence model: its own error row, named
    capsys.readouterr()
    single = [str(run / "best.pt"), str(rows[0][0][0]), "--output", str(out), "--no-progress"]
    assert infer_main(single) == 1
    (row,) = read_csv(out)[1]
    assert "1 channels" in row["error"] and "takes 3" in row["error"]


def test_a_manifest_without_its_channel_columns_is_one_line(
    tmp_path, subjects, capsys, trained_run
):
    root, rows = subjects
    manifest = write_manifest(root / "m.csv", rows[:2])
    output = ["--output-dir", str(tmp_path / "ev"), "--no-progress"]
    code = evaluate_main([str(trained_run / "best.pt"), str(manifest), *output])
    assert code == 2
    assert_one_line_error(capsys, "volumetric-evaluate", "path,label", "missing: path")

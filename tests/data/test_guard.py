"""Safe to deploy on an archive: the DICOM series filter (data.series_filter) and the modality
guard, with real DICOM series written by SimpleITK: a CT volume, an MR volume, a derived MIP and
a three-slice scout in one study folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY_CONFIG,
    assert_one_line_error,
    make_tiny_dataset,
    read_csv,
    train,
    write_config,
    write_scan,
)
from test_dicom import voxels, write_series

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import evaluate_main, infer_main
from volumetric.config import config_from_dict
from volumetric.data.discovery import find_scans, read_manifest
from volumetric.data.modality import scan_modality
from volumetric.data.series_filter import SeriesFilter
from volumetric.data.source import ScanSource
from volumetric.errors import VolumetricError

CT_FILTER = {"modality": ["CT"], "image_type": "original", "min_slices": 5}


def archive(folder: Path, seed: int = 0) -> dict[str, ScanSource]:
    """One study folder of four series; the scans by what they are."""
    write_series(
        folder,
        voxels(seed),
        "1.2.3.1",
        modality="CT",
        names="A{:04d}",
        description="abdomen venous",
    )
    write_series(folder, voxels(seed + 1), "1.2.3.2", modality="MR", names="B{:04d}")
    write_series(
        folder,
        voxels(seed + 2),
        "1.2.3.3",
        modality="CT",
        names="C{:04d}",
        image_type="DERIVED\\SECONDARY\\MIP",
        description="MIP",
    )
    write_series(folder, voxels(seed + 3, (16, 16, 3)), "1.2.3.4", modality="CT", names="D{:04d}")
    scans = {s.series_uid: s for s in find_scans([folder])}
    return {
        "ct": scans["1.2.3.1"],
        "mr": scans["1.2.3.2"],
        "mip": scans["1.2.3.3"],
        "scout": scans["1.2.3.4"],
    }


def test_the_series_filter_keeps_original_ct_volumes(tmp_path):
    scans = archive(tmp_path / "study")
    keep = SeriesFilter.from_config(CT_FILTER)
    assert keep.problem(scans["ct"]) == ""
    assert "modality MR is not one of ['CT']" in keep.problem(scans["mr"])
    assert "ImageType DERIVED\\SECONDARY\\MIP is not ORIGINAL\\PRIMARY" in keep.problem(
        scans["mip"]
    )
    assert "3 slices, fewer than min_slices 5" in keep.problem(scans["scout"])
    described = SeriesFilter.from_config({"description": "venous"})
    assert described.problem(scans["ct"]) == "" and "does not match" in described.problem(
        scans["mip"]
    )
    assert SeriesFilter.from_config(None) is None


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"modalty": ["CT"]}, "data.series_filter.modalty"),
        ({"image_type": "derived"}, "data.series_filter.image_type"),
        ({"min_slices": 0}, "data.series_filter.min_slices"),
        ({"description": "(unclosed"}, "data.series_filter.description"),
    ],
)
def test_series_filter_errors_name_the_key(settings, key):
    with pytest.raises(VolumetricError, match=key.replace(".", r"\.")):
        config_from_dict({"data": {"series_filter": settings}})


def test_modality_from_dicom_manifest_and_sidecar(tmp_path):
    scans = archive(tmp_path / "study")
    assert scan_modality(scans["ct"]) == "CT" and scan_modality(scans["mr"]) == "MR"
    nifti = write_scan(tmp_path / "sub-01_T1w.nii.gz", np.ones((8, 8, 8), np.float32))
    assert scan_modality(ScanSource.of(nifti)) is None
    (tmp_path / "sub-01_T1w.json").write_text(json.dumps({"Modality": "MR", "EchoTime": 0.003}))
    assert scan_modality(ScanSource.of(nifti)) == "MR"
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,modality\nsub-01_T1w.nii.gz,ct\n")
    (entry,) = read_manifest(manifest, labelled=False)
    assert scan_modality(entry.source) == "CT"  # the manifest's word wins


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> Path:
    """A tiny model trained on CT DICOM series with the CT filter: MR, MIP and scout left out."""
    root = tmp_path_factory.mktemp("ct")
    for label, seeds in (("healthy", range(0, 40, 10)), ("lesion", range(100, 140, 10))):
        for seed in seeds:
            archive(root / "data" / label / f"study{seed}", seed)
    config = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "series_filter": CT_FILTER}}
    run = root / "run"
    assert train(root / "data", run, write_config(root / "c.yaml", config)) == 0
    return run


@pytest.mark.slow  # writes 32 DICOM series and trains
def test_training_records_the_modality_and_what_it_left_out(ct_run):
    assert load_checkpoint(ct_run / "best.pt").modalities == ["CT"]
    summary = json.loads((ct_run / "dataset_summary.json").read_text())
    assert summary["modality"] == {"CT": 8} and summary["usable"] == 8
    left_out = summary["left_out_series"]
    assert len(left_out) == 24
    assert sum("modality MR" in why for why in left_out.values()) == 8
    assert sum("DERIVED" in why for why in left_out.values()) == 8
    assert sum("fewer than min_slices" in why for why in left_out.values()) == 8


@pytest.mark.slow  # uses the trained CT model
def test_inference_refuses_another_modality_and_filtered_series(ct_run, tmp_path, caplog):
    study = tmp_path / "new"
    archive(study, seed=7)
    nifti = write_scan(
        tmp_path / "unknown.nii.gz", voxels(9).astype(np.float32), spacing=(1.5, 1.5, 2.0)
    )
    output = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING, logger="volumetric"):
        status = infer_main(
            [
                str(ct_run / "best.pt"),
                str(study),
                str(nifti),
                "--output",
                str(output),
                "--no-progress",
            ]
        )
    assert status == 1  # some rows failed
    rows = {(r["series_uid"] or Path(r["path"]).name): r for r in read_csv(output)[1]}
    assert rows["1.2.3.1"]["error"] == "" and rows["1.2.3.1"]["prediction"]
    assert "left out by data.series_filter: modality MR" in rows["1.2.3.2"]["error"]
    assert (
        "ImageType DERIVED" in rows["1.2.3.3"]["error"] and "min_slices" in rows["1.2.3.4"]["error"]
    )
    assert rows["unknown.nii.gz"]["error"] == ""  # unknown modality: scored, with one warning
    assert caplog.text.count("its modality is unknown") == 1
    # an MR series of its own: refused as the wrong modality, unless allowed
    mr = tmp_path / "mr"
    write_series(mr, voxels(3), "1.2.3.9", modality="MR")
    argv = [str(ct_run / "best.pt"), str(mr), "--output", str(tmp_path / "q.csv"), "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("volumetric.data.series_filter.SeriesFilter.problem", lambda self, source: "")
        assert infer_main(argv) == 1
        (row,) = read_csv(tmp_path / "q.csv")[1]
        assert "model trained on CT, scan is MR" in row["error"]
        assert infer_main([*argv, "--allow-modality-mismatch"]) == 0


def label_modality(data: Path, modality: str) -> Path:
    """A BIDS-style JSON sidecar stating ``modality`` beside every scan of ``data``."""
    for scan in data.rglob("*.nii*"):
        (scan.parent / (scan.name.split(".nii")[0] + ".json")).write_text(
            json.dumps({"Modality": modality})
        )
    return data


def test_evaluation_refuses_another_modality_unless_allowed(tiny_dataset, tmp_path, capsys, caplog):
    """Metrics over scans the model would refuse in use describe nothing: evaluate stops with one
    line and writes nothing, as inference gives such scans an error row."""
    run = tmp_path / "run"
    assert train(label_modality(tiny_dataset, "MR"), run, write_config(tmp_path / "c.yaml")) == 0
    assert load_checkpoint(run / "best.pt").modalities == ["MR"]
    ct = label_modality(make_tiny_dataset(tmp_path / "ct"), "CT")
    out = tmp_path / "eval"
    argv = [str(run / "best.pt"), str(ct), "--output-dir", str(out), "--no-progress", "--no-report"]
    capsys.readouterr()
    assert evaluate_main(argv) == 2
    assert_one_line_error(
        capsys, "volumetric-evaluate", "20 of 20 scans", "model trained on MR, scan is CT"
    )
    assert not out.exists()
    assert evaluate_main([*argv, "--allow-modality-mismatch"]) == 0
    assert (out / "metrics.json").is_file()
    # scans that state no modality are scored as the model's, with one warning
    unknown = make_tiny_dataset(tmp_path / "unknown")
    with caplog.at_level(logging.WARNING, logger="volumetric"):
        assert evaluate_main([*argv[:1], str(unknown), *argv[2:]]) == 0
    assert caplog.text.count("its modality is unknown") == 1

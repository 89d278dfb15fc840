"""volumetric-plan: preprocessing planned from the data (modality, intensities, spacings, sizes),
and the warning of volumetric-train when the data contradicts its defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import write_scan

from volumetric.cli import plan_main, pretrain_main, train_main
from volumetric.config import load_config
from volumetric.data.discovery import inference_inputs
from volumetric.data.plan import Fingerprint, header_shape, target_spacing
from volumetric.data.plan import plan as make_plan
from volumetric.data.source import ScanSource


def synthetic_ct(root: Path, thickness=(3.0, 3.0, 3.0)) -> Path:
    """int16 HU: air around a body of soft tissue (about 40 HU) with a block of bone (900 HU)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i, slice_mm in enumerate(thickness):
            volume = np.full((40, 40, 24), -1000, np.int16)
            volume[8:32, 8:32, 4:20] = rng.normal(40, 20, (24, 24, 16)).astype(np.int16)
            volume[15:20, 15:25, 8:16] = 900
            write_scan(root / label / f"ct{i}.nii.gz", volume, spacing=(0.8, 0.8, slice_mm))
    return root


def synthetic_mr(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        for i in range(3):
            volume = rng.gamma(2.0, 150.0, (32, 32, 32)).astype(np.float32)  # positive units
            write_scan(root / label / f"mr{i}.nii.gz", volume, spacing=(1.0, 1.0, 1.0))
    return root


def planned(tmp_path: Path, data: Path, *extra: str) -> dict:
    output = tmp_path / "plan.yaml"
    assert plan_main([str(data), "--output", str(output), *extra]) == 0
    load_config(output)  # a complete config that loads
    return yaml.safe_load(output.read_text()), output.read_text()


def test_a_ct_folder_gets_the_ct_scheme(tmp_path):
    config, text = planned(tmp_path, synthetic_ct(tmp_path / "ct"))
    data = config["data"]
    assert data["intensity"] == "ct_dataset"
    low, high = data["ct_window"]
    assert -100 < low < 40 < high <= 900  # the foreground's 0.5 and 99.5 percentiles
    mean, std = data["ct_stats"]
    assert 40 < mean < 400 and std > 20
    assert not any("RandomBiasField" in step for step in config["augment"])
    assert data["spacing"] == [0.8, 0.8, 3.0]
    assert data["target_shape"] == [40, 40, 24] and config["train"]["batch_size"] == 8
    assert "# CT (intensities below -500: air in HU)" in text  # every choice says why
    assert "the 0.5 and 99.5 percentiles" in text


def test_an_mri_folder_gets_the_per_scan_zscore(tmp_path):
    config, text = planned(tmp_path, synthetic_mr(tmp_path / "mr"))
    assert config["data"]["intensity"] == "zscore" and config["data"].get("ct_stats") is None
    assert any("RandomBiasField" in step for step in config["augment"])
    assert "MR (intensities)" in text


def test_thick_slices_take_the_10th_percentile():
    spacings = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 1.0]] * 2)  # mostly 5 mm slices
    spacing, why = target_spacing(spacings)
    assert spacing == [0.7, 0.7, 1.0] and "10th percentile" in why
    even, _ = target_spacing(np.array([[1.0, 1.0, 1.2], [1.0, 1.0, 1.4]]))
    assert even == [1.0, 1.0, 1.3]


def test_the_plan_from_a_fingerprint_with_a_known_modality():
    fp = Fingerprint(
        scans=2,
        modality="CT",
        modality_source="header",
        spacings=np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
        sizes=np.array([[64, 64, 40], [100, 64, 40]]),
        foreground=np.linspace(-400, 1500, 1000),
    )
    result = make_plan(fp, patch=8)
    assert result.values["data"]["intensity"] == "ct_dataset"
    assert result.values["data"]["target_shape"] is None  # 100 vs 64: too different to batch
    assert "from the headers" in result.reasons["data.intensity"]


def test_training_without_a_config_warns_of_ct_data(tmp_path, caplog):
    data = synthetic_ct(tmp_path / "ct")
    argv = [str(data), "--output-dir", str(tmp_path / "run"), "--print-config"]
    with caplog.at_level(logging.WARNING, logger="volumetric"):
        assert train_main(argv) == 0  # --print-config: warns, trains nothing
    assert "look like CT" in caplog.text and "volumetric-plan" in caplog.text


@pytest.mark.parametrize("argv, fragment", [(["--sample", "0"], "--sample 0")])
def test_bad_plan_arguments(tmp_path, capsys, argv, fragment):
    from conftest import assert_one_line_error

    data = synthetic_mr(tmp_path / "mr")
    assert plan_main([str(data), "--output", str(tmp_path / "p.yaml"), *argv]) == 2
    assert_one_line_error(capsys, "volumetric-plan", fragment)


def scans_of(root: Path, shapes, affine=None) -> list[ScanSource]:
    """One float32 NIfTI per shape; voxel axes along R, A, S (1.5 × 1.5 × 2 mm) unless
    ``affine`` says otherwise."""
    rng = np.random.default_rng(2)
    paths = []
    for i, shape in enumerate(shapes):
        path = root / "a" / f"s{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        volume = rng.normal(100, 10, shape).astype(np.float32)
        nib.save(
            nib.Nifti1Image(volume, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine),
            path,
        )
        paths.append(ScanSource.of(path))
    return paths


def test_scans_of_one_size_share_a_padded_shape(tmp_path):
    config = load_config(None, ["model.patch_size=8"])
    same = scans_of(tmp_path / "same", [(20, 18, 16), (19, 18, 15)])
    assert header_shape(same, config) == [24, 24, 16]  # the largest, rounded up: nothing cropped
    unlike = scans_of(tmp_path / "unlike", [(20, 18, 16), (30, 18, 16)])  # 1.5x on one axis
    assert header_shape(unlike, config) is None
    # resampling counts: at 3 mm the 2 mm axis shrinks by a third (16 → 11, padded to 16)
    assert header_shape(same, load_config(None, ["data.spacing=3.0"])) == [16, 16, 16]
    assert header_shape([], config) is None


def test_the_shared_shape_is_in_the_axis_order_of_reorientation(tmp_path):
    """A scan stored slice axis first is reoriented to RAS before it is padded: its header's sizes
    count in RAS order, as the grid preprocessing gives it."""
    permuted = np.zeros((4, 4))  # voxel axes (S, R, A)
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 2.0, 1.5, 1.5, 1.0
    stored = scans_of(tmp_path / "p", [(16, 24, 18)], affine=permuted)
    plain = scans_of(tmp_path / "q", [(24, 18, 16)])
    config = load_config(None, ["model.patch_size=8"])
    assert header_shape(stored + plain, config) == [24, 24, 16]
    kept = load_config(None, ["model.patch_size=8", "data.canonical=false"])
    assert header_shape(stored + plain, kept) is None  # unreoriented, (16, 24, 18) vs (24, 18, 16)


def test_training_without_a_config_batches_scans_of_one_size(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    scans_of(data, [(20, 18, 16)] * 2)
    with caplog.at_level(logging.INFO, logger="volumetric"):
        assert train_main([str(data), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["target_shape"] == [24, 24, 16] and printed["train"]["batch_size"] == 8
    assert printed["model"]["pool"] == "max" and printed["model"]["stem"] == "conv"
    assert "are of one size" in caplog.text
    # what the command line sets stays, and a config file is taken as it is
    assert train_main([str(data), "--print-config", "--train.batch_size=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["target_shape"] is None and printed["train"]["batch_size"] == 1
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    assert train_main([str(data), "--print-config", "--config", str(config)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["target_shape"] is None
    # scans of other sizes keep their own grids, batches of one
    scans_of(tmp_path / "mixed", [(20, 18, 16), (40, 18, 16)])
    assert train_main([str(tmp_path / "mixed"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["batch_size"] == 1


def test_pretraining_without_a_config_batches_scans_of_one_size(tmp_path, capsys):
    data = tmp_path / "unlabeled"
    scans_of(data, [(20, 18, 16), (19, 18, 15)])
    assert pretrain_main([str(data), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["target_shape"] == [24, 24, 16] and printed["train"]["batch_size"] == 8
    assert pretrain_main([str(data), "--print-config", "--data.target_shape=null"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["target_shape"] is None and printed["train"]["batch_size"] == 1


def test_pretraining_without_a_config_finds_its_scans_once(tmp_path, monkeypatch):
    import volumetric.data.discovery as discovery
    import volumetric.engine.pretrain as pretraining

    data = tmp_path / "unlabeled"
    scans_of(data, [(20, 18, 16)] * 4)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return inference_inputs(*args, **kwargs)

    monkeypatch.setattr(pretraining, "inference_inputs", counted)
    monkeypatch.setattr(discovery, "inference_inputs", counted)  # imported at the call
    tiny = ["--model.patch_size=4", "--model.embed_dim=16", "--model.depth=1"]
    tiny += ["--model.num_heads=2", "--pretrain.epochs=1", "--pretrain.decoder_dim=16"]
    tiny += ["--pretrain.decoder_depth=1", "--pretrain.decoder_heads=2"]
    run = tmp_path / "run"
    argv = [str(data), "--output-dir", str(run), "--no-progress", "--no-report", *tiny]
    assert pretrain_main(argv) == 0
    assert len(calls) == 1 and (run / "pretrained.pt").is_file()

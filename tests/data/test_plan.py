"""volumetric-plan: preprocessing planned from the data (modality, intensities, spacings, sizes),
and the warning of volumetric-train when the data contradicts its defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_scan

from volumetric.cli import plan_main, train_main
from volumetric.config import load_config
from volumetric.data.plan import Fingerprint, target_spacing
from volumetric.data.plan import plan as make_plan


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

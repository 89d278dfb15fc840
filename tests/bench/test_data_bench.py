"""volumetric-bench --data: the generated scans look like CT, the whole harness runs on a tiny
set and reports every figure, and the command line reaches it with its options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from volumetric.bench import data as data_bench
from volumetric.bench.data import FIGURES, DataBenchSettings, phantom, run_and_report
from volumetric.cli import bench_main
from volumetric.errors import VolumetricError

TINY = dict(
    scans=4,
    in_plane=64,
    depth_range=(36, 44),
    embed_dim=24,
    depth=1,
    heads=2,
    sample_every_s=0.05,
)


def test_phantom_is_ct_like_and_the_lesion_is_brighter():
    spacing = (0.7, 0.7, 1.0)
    plain = phantom(np.random.default_rng(0), (96, 96, 60), spacing, lesion=False)
    lesion = phantom(np.random.default_rng(0), (96, 96, 60), spacing, lesion=True)
    assert plain.dtype == np.int16 and plain.shape == (96, 96, 60)
    assert plain[0, 0].mean() < -950  # air in the corner
    assert 0 < np.median(plain[40:56, 40:56, :20]) < 60  # soft tissue in the middle
    assert plain.max() > 650  # bone
    assert (lesion > 100).sum() > (plain > 100).sum()  # the blob


@pytest.mark.slow
def test_tiny_run_reports_every_figure(tmp_path: Path, capsys):
    settings = DataBenchSettings(data_dir=tmp_path / "scans", **TINY)
    output = tmp_path / "benchmarks.md"
    result = run_and_report(settings, output, "volumetric-bench --data (test)", "data-cpu")
    assert data_bench.finite_and_positive(result), {k: result[k] for k in FIGURES}
    assert len(list((tmp_path / "scans").rglob("*.nii.gz"))) == 4  # kept in --data-dir
    text = output.read_text()
    assert "<!-- data-cpu begin -->" in text and "<!-- data-cpu end -->" in text
    assert "## Data pipeline (`volumetric-bench --data`)" in text
    assert "`volumetric-bench --data (test)`" in text
    for what, _, _ in FIGURES.values():
        assert what in text
    printed = capsys.readouterr().out
    assert all(what in printed for what, _, _ in FIGURES.values())


def test_cli_runs_only_the_data_bench_with_its_options(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(data_bench, "run_and_report", lambda *args: calls.append(args))
    argv = ["--data", "--data-scans", "6", "--data-dir", str(tmp_path), "--device", "cpu"]
    assert bench_main([*argv, "--output", str(tmp_path / "b.md")]) == 0
    (settings, output, command, marker) = calls[0]
    assert settings.scans == 6 and settings.data_dir == tmp_path and settings.device == "cpu"
    assert output == tmp_path / "b.md" and marker == "data-cpu"
    assert command.startswith("volumetric-bench --data --data-scans 6")


def test_too_few_scans_is_refused():
    with pytest.raises(VolumetricError, match="at least 4"):
        data_bench.run_data_bench(DataBenchSettings(scans=2))

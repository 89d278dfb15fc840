"""The disk cache: keyed on the files and the preprocessing, memory-mapped, compact within its
stated error, atomic, rebuilt when broken; volumetric-cache info and clear."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
from conftest import blob_volume, write_scan

from volumetric.cli import cache_main
from volumetric.data.cache import DiskCache, clear, default_cache_dir, scan_files, summarize

SETTINGS = {"spacing": 1.5, "intensity": "zscore", "target_shape": None, "patch_size": 4}


@pytest.fixture
def scan(tmp_path):
    return write_scan(
        tmp_path / "a.nii.gz", blob_volume(np.random.default_rng(0), (12, 10, 8), True)
    )


def volume() -> torch.Tensor:
    return torch.randn(1, 8, 8, 4) * 3  # (C, W, H, D), z-score-like


def test_round_trip_is_float16_within_its_bound(tmp_path, scan):
    cache = DiskCache.for_preprocessing(tmp_path / "c", SETTINGS, 1)
    data, affine = volume(), np.diag([1.5, 1.5, 1.5, 1.0])
    stored = cache.store(scan, data, affine)
    entry = cache.entry(scan)
    assert np.load(entry).dtype == np.float16
    loaded, loaded_affine = cache.load(scan)
    assert torch.equal(loaded, stored) and np.array_equal(loaded_affine, affine)
    # the bound docs state: |x~ - x| <= 2^-11 |x| (normal range), <= 2^-25 near zero
    bound = torch.maximum(data.abs() * 2.0**-11, torch.full_like(data, 2.0**-25))
    assert ((loaded - data).abs() <= bound).all()
    assert not torch.equal(loaded, data)  # it is float16: the bound is not vacuous


def test_raw_intensities_stay_float32(tmp_path, scan):
    cache = DiskCache.for_preprocessing(tmp_path / "c", {**SETTINGS, "intensity": "none"}, 1)
    data = volume() * 1000  # HU-like
    cache.store(scan, data, np.eye(4))
    assert np.load(cache.entry(scan)).dtype == np.float32
    assert torch.equal(cache.load(scan)[0], data)


def test_key_follows_the_files_and_the_preprocessing(tmp_path, scan):
    cache = DiskCache.for_preprocessing(tmp_path / "c", SETTINGS, 1)
    entry = cache.entry(scan)
    assert entry == cache.entry(scan)
    other_spacing = DiskCache.for_preprocessing(tmp_path / "c", {**SETTINGS, "spacing": 2.0}, 1)
    two_channels = DiskCache.for_preprocessing(tmp_path / "c", SETTINGS, 2)
    assert other_spacing.entry(scan) != entry and two_channels.entry(scan) != entry
    stat = scan.stat()
    os.utime(scan, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed
    assert cache.entry(scan) != entry


def test_every_file_of_a_series_folder_is_in_the_key(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i:04d}").write_bytes(b"x" * (i + 1))
    (series / ".DS_Store").write_bytes(b"hidden")
    assert [p.name for p in scan_files(series)] == ["IM0000", "IM0001", "IM0002"]
    cache = DiskCache.for_preprocessing(tmp_path / "c", SETTINGS, 1)
    before = cache.entry(series)
    (series / "IM0001").write_bytes(b"changed slice")
    assert cache.entry(series) != before


def test_broken_entry_is_rebuilt_with_a_warning(tmp_path, scan, caplog):
    cache = DiskCache.for_preprocessing(tmp_path / "c", SETTINGS, 1)
    cache.store(scan, volume(), np.eye(4))
    entry = cache.entry(scan)
    entry.write_bytes(entry.read_bytes()[:100])  # a torn file, as a disk error could leave
    with caplog.at_level(logging.WARNING):
        assert cache.load(scan) is None
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text


def test_default_folder_follows_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLUMETRIC_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VOLUMETRIC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "volumetric"


def test_info_and_clear(tmp_path, scan, capsys):
    root = tmp_path / "c"
    cache = DiskCache.for_preprocessing(root, SETTINGS, 1)
    cache.store(scan, volume(), np.eye(4))
    other = DiskCache.for_preprocessing(root, {**SETTINGS, "spacing": 3.0}, 1)
    other.store(scan, volume(), np.eye(4))
    old = time.time() - 10 * 86400
    os.utime(other.entry(scan).with_suffix(".json"), (old, old))  # last used 10 days ago
    assert summarize(root).entries == 2
    assert cache_main(["info", "--cache-dir", str(root)]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert clear(root, older_than_days=5) == (1, pytest.approx(1, abs=10**9))
    assert cache.load(scan) is not None and other.load(scan) is None
    assert cache_main(["clear", "--cache-dir", str(root)]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out and summarize(root).entries == 0

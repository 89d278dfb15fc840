"""Shared fixtures: tiny NIfTI data sets written into temporary folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch


def write_scan(path: Path, data: np.ndarray, spacing=(1.5, 1.5, 2.0)) -> Path:
    """Write a NIfTI file (.nii or .nii.gz by the name) with the given voxel spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def blob_volume(rng: np.random.Generator, shape, bright: bool) -> np.ndarray:
    """Noise, plus a bright cube in one random corner region for the positive class."""
    data = rng.normal(100.0, 10.0, size=shape)
    if bright:
        x, y, z = (int(rng.integers(0, s - s // 3)) for s in shape)
        data[x : x + shape[0] // 3, y : y + shape[1] // 3, z : z + shape[2] // 3] += 80.0
    return data


def make_tiny_dataset(root: Path) -> Path:
    """root/<class>/*.nii[.gz]: 10 scans per class, 20×18×16 voxels, spacing 1.5×1.5×2 mm."""
    rng = np.random.default_rng(0)
    for label, bright in (("healthy", False), ("lesion", True)):
        for i in range(10):
            suffix = ".nii.gz" if i % 2 else ".nii"
            write_scan(
                root / label / f"scan{i:02d}{suffix}", blob_volume(rng, (20, 18, 16), bright)
            )
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """root/<class>/*.nii[.gz]: 10 scans per class, 20×18×16 voxels, spacing 1.5×1.5×2 mm."""
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_dataset_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data set as ``tiny_dataset``, written once per session for tests that only read it."""
    return make_tiny_dataset(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

"""Shared fixtures and helpers: tiny NIfTI data sets written into temporary folders, the tiny training
config and the command-line helpers the end-to-end tests share (import them with
``from conftest import ...``).

Tests that take more than ~8 s each are marked ``slow`` (registered in setup.cfg). Everything runs by
default (``./scripts/test.sh``, CI); skip the slow ones while iterating with

    python -m pytest -m "not slow"        # or: ./scripts/test.sh -m "not slow"
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

# Triton's interpreter runs the seq-norm kernels on CPU tensors (tests/layers/test_triton.py). It
# must be chosen before anything imports triton (torch._dynamo does), so here, first; a machine
# with CUDA compiles the kernels for real.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

TINY_CONFIG = {
    "model": {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2},
    "data": {"spacing": 1.5, "target_shape": [16, 16, 16]},
    "augment": [{"RandomFlip": {"axes": [0]}}],
    "train": {"epochs": 2, "batch_size": 4, "device": "cpu"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three classes, two scans each (rows sum to 1). One-vs-rest AUROC: class a 1 (perfect), class b 7/8
# (0.4 < 0.5 of a c scan), class c 7.5/8 (0.3 ties with a b scan) → macro (1 + 7/8 + 15/16) / 3 = 15/16.
#   predictions a a b b c b → confusion [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
THREE_LABELS = [0, 0, 1, 1, 2, 2]
THREE_PROBS = [
    [0.8, 0.1, 0.1],
    [0.6, 0.3, 0.1],
    [0.1, 0.7, 0.2],
    [0.3, 0.4, 0.3],
    [0.1, 0.2, 0.7],
    [0.2, 0.5, 0.3],
]


# ---------------------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------------------- command line


def write_config(path: Path, config: dict = TINY_CONFIG) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def train(data: Path, run: Path, config: Path | None, *extra: str) -> int:
    """volumetric-train in-process: the exit status. (Imported here, so that a broken CLI fails the
    tests that train, not the collection of every test.) Without report.html (its bootstrap and
    plots cost seconds a run) unless ``extra`` holds ``--report``, as ``trained_run`` does."""
    from volumetric.cli import train_main

    args = [str(data), "--output-dir", str(run), "--no-progress", "--no-report", *extra]
    return train_main(args + (["--config", str(config)] if config else []))


def assert_one_line_error(capsys, prog: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# Numbers stored in the repository (fixtures, pinned literals) were computed on the CPU that wrote
# them; a test computes them again on whatever CPU runs it. Each tolerance says how far two x86-64
# CPUs may legitimately disagree, and why; results computed twice in one test run keep `==`.
STORED_TOLERANCE = {
    # float32 inference: BLAS and oneDNN pick other kernels (AVX2, AVX-512) on other CPUs, which
    # sum in another order; seen: 3e-8 between an AMD EPYC and an Intel Xeon
    "float32 probabilities": 1e-6,
    # float64 NumPy/scikit-learn arithmetic without BLAS (sorting, cumulative sums): the same
    # operations in the same order everywhere, so only the last bits may move
    "float64 statistics": 1e-12,
}


def assert_matches_stored(actual, stored, kind: str, what: str = "") -> None:
    """``actual`` (computed now) against ``stored`` (recorded in the repository on another CPU),
    element by element, within ``STORED_TOLERANCE[kind]`` absolute; lengths must match."""
    atol = STORED_TOLERANCE[kind]
    actual, stored = (
        np.atleast_1d(np.asarray(actual, float)),
        np.atleast_1d(np.asarray(stored, float)),
    )
    assert actual.shape == stored.shape, f"{what}: shape {actual.shape}, stored {stored.shape}"
    worst = float(np.max(np.abs(actual - stored))) if actual.size else 0.0
    assert worst <= atol, (
        f"{what}: {actual.tolist()} differs from the stored {stored.tolist()} by {worst:.3g} > {atol:g} ({kind})"
    )


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    """A complete, decodable PNG with something drawn on it, and no temporary file left beside it."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as image:
        image.load()
        assert image.width >= 300 and image.height >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """root/<class>/*.nii[.gz]: 10 scans per class, 20×18×16 voxels, spacing 1.5×1.5×2 mm."""
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_dataset_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data set as ``tiny_dataset``, written once per session for tests that only read it."""
    return make_tiny_dataset(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(scope="session")
def trained_run(tiny_dataset_shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch run of ``TINY_CONFIG`` on ``tiny_dataset_shared`` (4 optimizer steps per
    epoch), with its report.html, trained once per session and shared by the tests that only read
    it: copy it before changing it."""
    root = tmp_path_factory.mktemp("run")
    run = root / "run"
    assert train(tiny_dataset_shared, run, write_config(root / "tiny.yaml"), "--report") == 0
    return run


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The disk cache of preprocessed volumes in a temporary folder, never the user's
    ~/.cache/volumetric (subprocesses inherit the variable)."""
    previous = os.environ.get("VOLUMETRIC_CACHE")
    os.environ["VOLUMETRIC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("VOLUMETRIC_CACHE", None)
    else:
        os.environ["VOLUMETRIC_CACHE"] = previous


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def train_stopped_in_epoch_2(monkeypatch, data: Path, run: Path, config: Path, *extra: str) -> int:
    """volumetric-train, interrupted (KeyboardInterrupt) at the validation of epoch 2: epoch 1 is
    saved, epoch 2 is not. The exit status (130)."""
    import volumetric.engine.objective as objective

    calls, predict = [], objective.predict

    def predict_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predict(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(objective, "predict", predict_then_stop)
        return train(data, run, config, *extra)

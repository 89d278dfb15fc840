"""Training faults lose nothing: signals save a resumable state, kill -9 resumes from last.pt to the same
final weights, a NaN loss stops the run cleanly, and files are only ever replaced whole."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, assert_same_weights, train, weights, write_config

from volumetric.atomic_files import atomic_path, atomic_write_text
from volumetric.checkpoint import load_checkpoint
from volumetric.models.vit3d import VolumeTransformer

EPOCHS = 12
TRAIN = "from volumetric.cli import train_main; raise SystemExit(train_main())"


def start_training(data: Path, run: Path, config: Path) -> subprocess.Popen:
    """volumetric-train in its own process (signals and kill -9 must hit a real process)."""
    args = [
        sys.executable,
        "-c",
        TRAIN,
        str(data),
        "--output-dir",
        str(run),
        "--config",
        str(config),
        "--no-progress",
        f"--train.epochs={EPOCHS}",
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(
    run: Path, process: subprocess.Popen, epochs: int, timeout: float = 120.0
) -> None:
    """Return as soon as metrics.csv lists ``epochs`` finished epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended early: {process.communicate()}"
        try:
            if sum(1 for _ in csv.reader((run / "metrics.csv").open())) - 1 >= epochs:
                return
        except (FileNotFoundError, StopIteration):
            pass
        time.sleep(0.005)
    raise AssertionError("training too slow to reach the epoch")


@pytest.fixture(scope="module")
def reference(tiny_dataset_shared, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    assert (
        train(
            tiny_dataset_shared,
            root / "run",
            write_config(root / "tiny.yaml"),
            f"--train.epochs={EPOCHS}",
        )
        == 0
    )
    return root / "run"


@pytest.mark.slow  # a 12-epoch run in a subprocess, then a resume
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_matches(signum, reference, tiny_dataset_shared, tmp_path, capsys):
    run = tmp_path / "run"
    process = start_training(tiny_dataset_shared, run, write_config(tmp_path / "tiny.yaml"))
    wait_for_epochs(run, process, 2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    state = load_checkpoint(run / "last.pt")
    assert 2 <= state.epoch < EPOCHS  # saved where it stopped (mid-epoch: with a `partial` record)
    assert train(tiny_dataset_shared, run, None, "--resume") == 0
    assert_same_weights(weights(run / "last.pt"), weights(reference / "last.pt"))
    assert _same_losses(run, reference)


def _same_losses(run: Path, reference: Path) -> bool:
    """Equal history but for the wall-clock column."""

    def losses(path: Path) -> list[tuple[str, str]]:
        return [
            (r["train_loss"], r["val_loss"]) for r in csv.DictReader((path / "metrics.csv").open())
        ]

    return losses(run) == losses(reference)


@pytest.mark.slow  # a 12-epoch run in a subprocess, then a resume
def test_kill_9_then_resume_reaches_the_same_weights(reference, tiny_dataset_shared, tmp_path):
    run = tmp_path / "run"
    process = start_training(tiny_dataset_shared, run, write_config(tmp_path / "tiny.yaml"))
    wait_for_epochs(run, process, 3)
    process.kill()  # SIGKILL: no handler runs, whatever was being written is abandoned
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(run / "last.pt").epoch  # a complete file, never a torn one
    assert 3 <= saved < EPOCHS
    assert train(tiny_dataset_shared, run, None, "--resume") == 0
    assert load_checkpoint(run / "last.pt").epoch == EPOCHS
    assert_same_weights(weights(run / "last.pt"), weights(reference / "last.pt"))
    assert _same_losses(run, reference)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_dataset_shared, tmp_path, monkeypatch, capsys
):
    calls = {"n": 0}
    forward = VolumeTransformer.forward

    def poisoned(self, x):
        calls["n"] += 1
        out = forward(self, x)
        return (
            out * float("nan") if self.training and calls["n"] > 6 else out
        )  # epoch 1 (4 batches) is clean

    monkeypatch.setattr(VolumeTransformer, "forward", poisoned)
    run = tmp_path / "run"
    assert (
        train(tiny_dataset_shared, run, write_config(tmp_path / "tiny.yaml"), "--train.epochs=3")
        == 2
    )
    line = assert_one_line_error(capsys, "volumetric-train", "nan", "epoch 2", "last.pt")
    state = load_checkpoint(run / "last.pt")
    assert state.epoch == 1, line
    assert all(torch.isfinite(v).all() for v in state.weights.values() if v.is_floating_point())


def test_nan_loss_before_any_checkpoint_says_so(tiny_dataset_shared, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        VolumeTransformer, "forward", lambda self, x: torch.full((len(x), 2), float("nan"))
    )
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, write_config(tmp_path / "tiny.yaml")) == 2
    line = assert_one_line_error(capsys, "volumetric-train", "nan", "epoch 1")
    assert "no checkpoint" in line and not (run / "last.pt").exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary left behind
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.csv"
    ]


def test_atomic_write_is_a_rename(tmp_path, monkeypatch):
    """The new content appears in one os.replace of a complete temporary file beside the target."""
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src).parent, Path(src).read_text(), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_text(tmp_path / "a.txt", "complete")
    assert replaced == [(tmp_path, "complete", tmp_path / "a.txt")]


def test_atomic_write_gives_a_normal_file_mode(tmp_path):
    """mkstemp creates 0600 files; results must get the mode any file the user writes gets."""
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "p.csv", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == 0o640

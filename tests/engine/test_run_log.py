"""The training run log (TensorBoard events, learning_curves.png): appending and purging on resume,
and end to end on the shared tiny trained run (``trained_run``: 2 epochs of 4 optimizer steps)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from conftest import assert_png, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from volumetric.engine.run_log import RunLog


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reading of an event folder (purges applied): {tag: [(step, value), ...]}, values
    rounded to 6 decimals (they are stored as float32)."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


# ---------------------------------------------------------------------------------------------- run log


def test_run_log_appends_and_purges_on_resume(tmp_path):
    """A killed run logged steps 1-10 but last.pt holds step 6: the resumed run's steps 7-8 replace them."""
    history = [
        {
            "epoch": 1,
            "step": 6,
            "lr": 0.1,
            "train_loss": 0.9,
            "val_loss": 0.8,
            "val_auroc": math.nan,
        }
    ]
    with RunLog(tmp_path) as run_log:
        for step in range(1, 11):
            run_log.log_step(step, 1.0)
        run_log.log_epoch(history)
    assert_png(tmp_path / "learning_curves.png")
    time.sleep(1.1)  # event files are named by the second they were opened
    history.append(
        {"epoch": 2, "step": 8, "lr": 0.05, "train_loss": 0.5, "val_loss": 0.6, "val_auroc": 0.75}
    )
    with RunLog(tmp_path, start_step=6) as run_log:
        for step in (7, 8):
            run_log.log_step(step, 2.0)
        run_log.log_epoch(history)
    logged = scalars(tmp_path / "tensorboard")
    assert logged["train/batch_loss"] == [(s, 1.0) for s in range(1, 7)] + [(7, 2.0), (8, 2.0)]
    assert logged["train/loss"] == [(6, 0.9), (8, 0.5)]
    assert logged["train/epoch"] == [(6, 1.0), (8, 2.0)]
    assert logged["val/auroc"] == [(8, 0.75)]  # NaN is not logged
    assert "val/accuracy" not in logged
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_run_log_disabled_writes_nothing(tmp_path):
    with RunLog(tmp_path / "run", enabled=False) as run_log:
        run_log.log_step(1, 0.5)
        run_log.log_epoch([{"epoch": 1, "step": 1, "train_loss": 0.5}])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- end to end


def test_training_writes_tensorboard_and_learning_curves(trained_run):
    assert_png(trained_run / "learning_curves.png")
    assert len(list((trained_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    logged = scalars(trained_run / "tensorboard")
    assert [s for s, _ in logged["train/batch_loss"]] == list(range(1, 9))
    for tag in (
        "train/loss",
        "train/lr",
        "val/loss",
        "val/accuracy",
        "val/balanced_accuracy",
        "val/auroc",
    ):
        assert [s for s, _ in logged[tag]] == [4, 8], tag
    assert [v for _, v in logged["train/epoch"]] == [1.0, 2.0]


def test_resume_appends_to_tensorboard(trained_run, tiny_dataset_shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "learning_curves.png").read_bytes()
    time.sleep(1.1)  # the new event file must sort after the first (named by the second)
    assert train(tiny_dataset_shared, run, None, "--resume", "--train.epochs=3") == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = scalars(run / "tensorboard")
    assert [s for s, _ in logged["train/loss"]] == [4, 8, 12]
    assert [s for s, _ in logged["train/batch_loss"]] == list(range(1, 13))
    assert logged["train/loss"][:2] == scalars(trained_run / "tensorboard")["train/loss"]
    after = (run / "learning_curves.png").read_bytes()
    assert after != before  # redrawn with the third epoch
    assert_png(run / "learning_curves.png")

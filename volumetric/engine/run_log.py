"""What a training run logs besides metrics.csv: TensorBoard scalars and learning_curves.png.

TensorBoard (``OUTPUT_DIR/tensorboard/``, view with ``tensorboard --logdir OUTPUT_DIR``) gets, against
the optimizer step on the x-axis:

    train/batch_loss       every optimizer step: the loss of its last batch
    train/loss, train/lr   every epoch: mean training loss, learning rate at the end of the epoch
    train/epoch            every epoch: the epoch number (to map steps to epochs)
    val/loss, val/accuracy, val/balanced_accuracy, val/auroc    every epoch with a validation set
    time/epoch_seconds     every epoch: wall-clock seconds

A resumed run appends to the same folder; the writer is opened with ``purge_step`` one past the
step of ``last.pt``, so that TensorBoard hides what a killed run logged after its last checkpoint
and the resumed run logs again. learning_curves.png is redrawn from the whole history after every
epoch. Nothing here draws random numbers, so a resumed run stays exact.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from volumetric.evaluation.plots import plot_learning_curves

# metrics.csv column → TensorBoard tag
EPOCH_TAGS = {
    "epoch": "train/epoch",
    "train_loss": "train/loss",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_balanced_accuracy": "val/balanced_accuracy",
    "val_auroc": "val/auroc",
    "seconds": "time/epoch_seconds",
}


class RunLog:
    """TensorBoard writer and learning-curve plot of one run folder; a context manager.

    ``start_step``: optimizer steps already done (0 for a new run, ``last.pt``'s step on resume).
    ``enabled=False`` makes every method a no-op and creates no file (e.g. processes other than
    rank 0 of a distributed run).
    """

    def __init__(
        self, output_dir: str | Path, *, start_step: int = 0, enabled: bool = True
    ) -> None:
        self.output_dir = Path(output_dir)
        log_dir = str(self.output_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1) if enabled else None

    def log_step(self, step: int, loss: float) -> None:
        """After optimizer step ``step``: the loss of its last batch."""
        if self.writer is not None and math.isfinite(loss):
            self.writer.add_scalar("train/batch_loss", loss, step)

    def log_epoch(self, history: list[dict[str, float]]) -> None:
        """After an epoch: its row (history[-1]) to TensorBoard, all rows to learning_curves.png."""
        if self.writer is None or not history:
            return
        row = history[-1]
        step = int(row["step"])
        for key, tag in EPOCH_TAGS.items():
            value = row.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # on disk before the next epoch: a kill -9 loses nothing logged so far
        plot_learning_curves(history, self.output_dir / "learning_curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The training loop: set up, restore, then per epoch train, validate, save.

AdamW, warm-up + cosine schedule, label smoothing, gradient accumulation, validation after every
epoch, best.pt (the best validation epoch by ``train.select``: balanced accuracy, AUROC or loss;
see `selection_score`) and last.pt, metrics.csv plus TensorBoard logs and learning_curves.png
(run_log.py).

Exact resumption: every epoch reseeds the global RNG (augmentation, dropout) and draws its batch
order from ``(seed, epoch)``, so a run resumed from ``last.pt`` follows the same path as one never
stopped. SIGTERM or SIGINT saves a resumable ``last.pt`` after the current optimizer step (with the
batch position and RNG state inside the epoch, `RunState.partial`) and stops; ``kill -9`` loses at
most the current epoch.

Under torchrun every process runs this same loop with DistributedDataParallel: each takes its
shard of the epoch's permutation (batch_size is per process) and of the validation set, gradients
are averaged at every optimizer step, and the validation predictions are gathered so that every
process computes the same metrics and takes the same best-checkpoint decision. Only rank 0 writes
files. Stops are agreed: a signal to any process, or a NaN loss on any process, stops all of them
at the same step (see distributed.py for why every process must call the same collectives).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from volumetric.atomic_files import atomic_write_csv, atomic_write_text
from volumetric.checkpoint import load_checkpoint, save_checkpoint
from volumetric.config import Config, save_config
from volumetric.data.loading import LoadingOptions, batches
from volumetric.data.source import Entry
from volumetric.engine.decide import fit_decision
from volumetric.engine.distributed import (
    World,
    all_gather,
    all_reduce_max,
    all_reduce_sum,
    distributed_session,
)
from volumetric.engine.interrupt import StopSignals, TrainingInterrupted
from volumetric.engine.objective import CLASSIFICATION_COLUMNS
from volumetric.engine.run_log import RunLog
from volumetric.engine.setup import Run, distribute, set_up
from volumetric.errors import VolumetricError
from volumetric.evaluation.evaluate import report_after_training
from volumetric.evaluation.report import ReportOptions, TrainingRecord
from volumetric.inference import load_model

log = logging.getLogger(__name__)

METRIC_COLUMNS = CLASSIFICATION_COLUMNS  # a classifier's metrics.csv (the objective's columns)


@dataclass
class TrainResult:
    output_dir: Path
    class_names: list[str]
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


@dataclass
class RunState:
    """Where a run stands between optimizer steps: what last.pt carries besides the weights and
    the optimizer, schedule and scaler states."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics.csv row per epoch
    best_score: list[float] = field(default_factory=lambda: [-math.inf, -math.inf])
    best_epoch: int = 0
    partial: dict[str, Any] | None = None  # the epoch a signal interrupted (see `_interrupt`)
    world_size: int = 1  # processes that trained it


@dataclass
class EpochProgress:
    """This process's running totals inside one epoch."""

    epoch: int
    batches: int  # this process's batches in the whole epoch
    done: int = 0  # of them, done
    loss_sum: float = 0.0  # summed per-scan training loss
    seen: int = 0  # scans
    seconds: float = 0.0  # spent before the epoch was (re)started here
    started: float = field(default_factory=time.perf_counter)


def train(
    config: Config,
    train_items: list[Entry],
    val_items: list[Entry] | None,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    report: ReportOptions | None = None,
    loader_hook: Callable[[DataLoader], Iterable] | None = None,
) -> TrainResult:
    """Train a classifier (config.model.arch) on labelled `Entry` items; writes checkpoints and
    logs to output_dir. Without ``val_items`` a stratified split of the training items validates.
    ``cache_dir``: where ``train.cache: disk`` keeps preprocessed volumes (default: see
    volumetric/data/cache.py). ``report``: at the end, rank 0 writes report.html of best.pt on the
    validation scans (volumetric/evaluation/report.py). ``loader_hook``: called once with the
    training DataLoader when the run is set up; the training loop iterates over what it returns
    (e.g. a wrapper that times each batch, as the data benchmark does)."""
    with distributed_session(config.train.device) as (world, device):
        run = set_up(
            config,
            train_items,
            val_items,
            Path(output_dir),
            world,
            device,
            resume=resume,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        state = fit(run, resume=resume, progress=progress, loader_hook=loader_hook)
    if world.is_main:  # after the session, as the report: no other process waits on it
        fit_decision(run)
    if report is not None and world.is_main:  # after the session: no other process waits on it
        given = "the validation data given (--val)" if val_items is not None else None
        write_run_report(run, state, report, given, progress=progress, cache_dir=cache_dir)
    best = state.history[state.best_epoch - 1]
    if world.is_main and "val_loss" in best:
        log.info(
            "best.pt: epoch %d, picked by train.select=%s", state.best_epoch, config.train.select
        )
    return TrainResult(run.output_dir, run.class_names, state.best_epoch, best, state.history)


def fit(
    run: Run,
    *,
    resume: bool,
    progress: bool,
    loader_hook: Callable[[DataLoader], Iterable] | None = None,
) -> RunState:
    """The run's epochs, after restoring last.pt when resuming: train, validate, save, log; a
    signal saves and stops (`TrainingInterrupted`). The same loop for every objective."""
    world = run.world
    if loader_hook is not None:
        # set_up's DataLoader, not wrapped yet
        run.train_loader = loader_hook(cast(DataLoader, run.train_loader))
    state = restore(run) if resume else RunState(world_size=world.size)
    distribute(run)
    if world.is_main:
        start_run_folder(run)
    show = progress and world.is_main
    with (
        StopSignals() as stop,
        RunLog(run.output_dir, start_step=state.step, enabled=world.is_main) as run_log,
    ):
        for epoch in range(state.epoch, run.epochs):
            totals = begin_epoch(run, state, epoch)
            train_epoch(run, state, totals, stop, run_log, progress=show)
            improved = finish_epoch(run, state, totals, progress=show)
            save(run, state, improved)
            if world.is_main:
                run_log.log_epoch(state.history)
            stop_if_signalled(run, stop, epoch)
    return state


# ------------------------------------------------------------------------------------- restore


def start_run_folder(run: Run) -> None:
    """config.yaml, split.csv, dataset_summary.json and, when scans were left out,
    skipped_scans.csv."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, run.output_dir / "config.yaml")
    write_split(run.output_dir / "split.csv", run.split)
    summary = run.data_summary
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    atomic_write_text(run.output_dir / "dataset_summary.json", text)
    skipped = [[path, problem] for path, problem in summary["unusable"].items()]
    if skipped:
        atomic_write_csv(run.output_dir / "skipped_scans.csv", ["path", "problem"], skipped)
    counts = {name: sum(roles.values()) for name, roles in summary["per_class"].items()}
    log.info(
        "%d scans usable of %d %s; preprocessed shape %s; summary in %s",
        summary["usable"],
        summary["scans"],
        counts,
        summary["preprocessed_shape"],
        run.output_dir / "dataset_summary.json",
    )


SPLIT_COLUMNS = ["path", "series_uid", "label", "group", "role"]


def write_split(path: Path, split: list[tuple[Entry, str]]) -> None:
    """split.csv: every scan of the training and validation data (the pre-flight's skipped ones
    too) with its role, train or validation; group empty where the data names none."""
    rows = [[e.source.path, e.source.series_uid, e.label, e.group or "", role] for e, role in split]
    atomic_write_csv(path, SPLIT_COLUMNS, rows)


def restore(run: Run) -> RunState:
    """Weights, optimizer, schedule and run state from last.pt of the run being resumed."""
    saved = load_checkpoint(run.last_path, map_location=run.device)
    if (
        saved.class_names != run.class_names
        or saved.arch != run.arch
        or saved.model_args != run.model_args
    ):
        raise VolumetricError(
            f"{run.last_path}: the run was started with other classes or model settings"
        )
    training = saved.training
    if training is None:
        raise VolumetricError(f"{run.last_path}: holds no training state to resume from")
    run.model.load_state_dict(saved.weights)
    run.optimizer.load_state_dict(training["optimizer"])
    run.scheduler.load_state_dict(training["scheduler"])
    run.scaler.load_state_dict(training["scaler"])
    state = RunState(
        epoch=saved.epoch,
        step=training["step"],
        history=training["history"],
        best_score=training["best_score"],
        best_epoch=training["best_epoch"],
        partial=training.get("partial"),
        world_size=training.get("world_size", 1),
    )
    _rescore_best(run, state, training.get("select", "balanced_accuracy"))
    if state.world_size != run.world.size:
        _reschedule(run, state)
    batch = f", batch {state.partial['batch']}" if state.partial else ""
    log.info("resuming %s after epoch %d%s", run.output_dir, state.epoch, batch)
    return state


def _rescore_best(run: Run, state: RunState, saved_select: str) -> None:
    """The best-so-far score, recomputed from best.pt's row of the history with this run's
    ``train.select``: a resume that changes the key compares later epochs with best.pt by the new
    key (the weights of other past epochs are gone, so best.pt stays until one beats it)."""
    select = run.objective.select
    if state.best_epoch:
        state.best_score = run.objective.score(state.history[state.best_epoch - 1])
    if saved_select != select and state.best_epoch:
        log.warning(
            "best.pt (epoch %d) was picked by train.select=%s; from now on %s picks it",
            state.best_epoch,
            saved_select,
            select,
        )


def _reschedule(run: Run, state: RunState) -> None:
    """An optimizer step covers world.size × batch_size scans: put the schedule where the same
    share of the training is done with this many processes (the step count goes on as it is)."""
    scans_done = state.partial["batch"] * run.config.train.batch_size if state.partial else 0
    share = state.epoch + scans_done * state.world_size / len(run.train_set)
    run.scheduler.last_epoch = round(share * run.steps_per_epoch) - 1
    run.scheduler.step()
    log.info(
        "the run used %d process(es), this one %d: schedule moved to step %d of %d",
        state.world_size,
        run.world.size,
        run.scheduler.last_epoch,
        run.total_steps,
    )


# ----------------------------------------------------------------------------------- one epoch


def begin_epoch(run: Run, state: RunState, epoch: int) -> EpochProgress:
    """Position the sampler and the RNG at the start of ``epoch``, or where a signal stopped it."""
    world, sampler = run.world, run.sampler
    sampler.epoch = epoch
    partial, state.partial = state.partial, None
    if partial is None:
        sampler.start = 0
        # augmentation and dropout of this epoch, different on each process
        torch.manual_seed(run.epoch_seed(epoch))
        return EpochProgress(epoch, batches=run.batches_remaining())
    # continue the interrupted epoch: its first items, over all processes, are done; the loss
    # sums saved are totals over them
    saved_world = partial.get("world_size", 1)
    same_world = saved_world == world.size
    sampler.start = partial["batch"] * run.config.train.batch_size * saved_world
    done = partial["batch"] if same_world else 0
    totals = EpochProgress(epoch, batches=done + run.batches_remaining(), done=done)
    if world.is_main:
        totals.loss_sum, totals.seen = partial["loss_sum"], partial["seen"]
    totals.seconds = partial["seconds"]
    if same_world:
        rngs = partial.get("rngs") or [partial["rng"]]  # one RNG state per process
        torch.set_rng_state(rngs[world.rank])
    else:  # another number of processes: the rest of the epoch gets a fresh draw
        torch.manual_seed(run.epoch_seed(epoch) + 7919 * sampler.start)
    return totals


def train_epoch(
    run: Run,
    state: RunState,
    totals: EpochProgress,
    stop: StopSignals,
    run_log: RunLog,
    *,
    progress: bool,
) -> None:
    """The optimizer steps of one epoch (from where ``totals`` stands); a signal saves and stops."""
    t = run.config.train
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    desc = f"epoch {totals.epoch + 1}/{run.epochs}"
    bar = tqdm(run.train_loader, desc=desc, disable=not progress, leave=False)
    for batch in batches(bar):
        stepping = (totals.done + 1) % t.grad_accum_steps == 0 or totals.done + 1 >= totals.batches
        value, scans = forward_backward(run, state, batch, stepping, totals.epoch)
        totals.loss_sum += value * scans
        totals.seen += scans
        totals.done += 1
        if not stepping:
            continue  # accumulate more batches before the optimizer step
        optimizer_step(run)
        state.step += 1
        run_log.log_step(state.step, value)
        bar.set_postfix(loss=f"{totals.loss_sum / max(totals.seen, 1):.4f}")
        signum = agreed_signal(stop, run.world)
        if signum is not None and totals.done < totals.batches:
            _interrupt(run, state, totals, signum)


def forward_backward(
    run: Run, state: RunState, batch: dict[str, Any], stepping: bool, epoch: int
) -> tuple[float, int]:
    """Loss and gradients of one batch: (its loss, its number of scans). A non-finite loss on any
    process stops every process at this batch."""
    distributed = run.world.distributed
    # DDP averages gradients in the backward of the batch that steps, not in those accumulated before
    # distributed: distribute() made train_model a DistributedDataParallel
    ddp = cast(DistributedDataParallel, run.train_model)
    with ddp.no_sync() if distributed and not stepping else nullcontext():
        loss, scans = run.objective.loss(run, batch, epoch)  # classification, or pretraining
        value = loss.item()
        # a NaN on any process makes the sum NaN: all processes stop at the same batch
        agreed = all_reduce_sum([value]).item() if distributed else value
        if not math.isfinite(agreed):
            _stop_on_bad_loss(run, state, value if not math.isfinite(value) else agreed, epoch)
        run.scaler.scale(loss / run.config.train.grad_accum_steps).backward()
    return value, scans


def optimizer_step(run: Run) -> None:
    """Clip, step (through the fp16 scaler when it is on), clear, advance the schedule."""
    if run.config.train.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.config.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def _stop_on_bad_loss(run: Run, state: RunState, bad: float, epoch: int) -> None:
    kept = (
        f"{run.last_path} holds the last good state"
        if run.last_path.exists()
        else "no checkpoint was saved yet"
    )
    raise VolumetricError(
        f"training loss became {bad} at epoch {epoch + 1}, step {state.step}; stopped. "
        f"{kept} (lower train.lr, or check the scans)"
    )


# ------------------------------------------------------------------------------------ stopping


def agreed_signal(stop: StopSignals, world: World) -> int | None:
    """The signal that stops the run, the same on every process: a collective, called by all at once."""
    if not world.distributed:
        return stop.signum
    return int(all_reduce_max([stop.signum or 0]).item()) or None


def _interrupt(run: Run, state: RunState, totals: EpochProgress, signum: int) -> None:
    """Save a last.pt that resumes inside this epoch, then stop every process."""
    seconds = totals.seconds + time.perf_counter() - totals.started
    loss_sum, seen = all_reduce_sum([totals.loss_sum, totals.seen]).tolist()  # over all processes
    rngs = [rng[0] for rng in all_gather(torch.get_rng_state()[None])]  # one per process
    state.partial = dict(
        batch=totals.done,
        loss_sum=loss_sum,
        seen=int(seen),
        seconds=seconds,
        rng=rngs[0],
        rngs=rngs,
        world_size=run.world.size,
    )
    if run.world.is_main:
        write_checkpoint(run, run.last_path, state, resumable=True)
    # no process exits before last.pt is written: torchrun would stop the writer with it
    all_reduce_sum([0])
    raise TrainingInterrupted(
        f"stopped by signal {signum} in epoch {totals.epoch + 1} after {totals.done} batches; "
        f"{run.last_path} saved, continue with --resume",
        signum,
    )


def stop_if_signalled(run: Run, stop: StopSignals, epoch: int) -> None:
    """After an epoch: stop when any process got a signal. A collective: rank 0 reaches it only
    with its files written, so no process leaves before that."""
    signum = agreed_signal(stop, run.world)
    if signum is not None:
        raise TrainingInterrupted(
            f"stopped by signal {signum} after epoch {epoch + 1}; {run.last_path} saved, "
            "continue with --resume",
            signum,
        )


# --------------------------------------------------------------------------- validate and save


def finish_epoch(run: Run, state: RunState, totals: EpochProgress, *, progress: bool) -> bool:
    """Validate, append the epoch's metrics row, and say whether it is the best epoch so far."""
    loss_sum, seen = all_reduce_sum([totals.loss_sum, totals.seen]).tolist()  # all processes' scans
    row: dict[str, float] = {
        "epoch": totals.epoch + 1,
        "step": state.step,
        "lr": cast(float, run.scheduler.get_last_lr()[0]),  # the optimizer's lr is a float
        "train_loss": loss_sum / max(seen, 1),
    }
    val_metrics: dict[str, float] = {}
    if len(run.val_set):
        val_metrics = run.objective.validate(run, progress=progress)
        row.update({f"val_{k}": v for k, v in val_metrics.items()})
    row["seconds"] = totals.seconds + time.perf_counter() - totals.started
    state.history.append(row)
    state.epoch = totals.epoch + 1
    log.info("epoch %d/%d  %s", state.epoch, run.epochs, format_row(row))
    select = run.objective.select
    score = run.objective.score(row)
    improved = score > state.best_score  # the same on every process: computed from the same rows
    if improved:
        state.best_score, state.best_epoch = score, state.epoch
        if val_metrics:
            value = row[f"val_{select}"]
            log.info(
                "best epoch so far: %d, by %s (%.4f)", state.epoch, run.objective.judged_by, value
            )
    return improved


def format_row(row: dict[str, float]) -> str:
    """A metrics row for the log: the learning rate in scientific notation, the rest to 4 decimals."""
    shown = [(k, v) for k, v in row.items() if k not in ("epoch", "step")]
    return "  ".join(f"{k}={v:.3e}" if k == "lr" else f"{k}={v:.4f}" for k, v in shown)


def write_checkpoint(run: Run, path: Path, state: RunState, *, resumable: bool) -> None:
    """best.pt (``resumable=False``: weights and what inference needs) or last.pt (plus the
    optimizer, schedule and run state that --resume needs) for the state after ``state.epoch``."""
    training = None
    if resumable:
        training = dict(
            optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            scaler=run.scaler.state_dict(),
            step=state.step,
            history=state.history,
            best_score=state.best_score,
            best_epoch=state.best_epoch,
            select=run.objective.select,  # the key best_score was computed by
            partial=state.partial,
            world_size=run.world.size,
        )
    metrics = state.history[state.epoch - 1] if 0 < state.epoch <= len(state.history) else {}
    save_checkpoint(
        path,
        model=run.objective.saved_model(run, resumable=resumable),
        **run.checkpoint_meta,
        epoch=state.epoch,
        metrics=metrics,
        training=training,
    )


def save(run: Run, state: RunState, improved: bool) -> None:
    """best.pt when the epoch improved, last.pt and metrics.csv; rank 0 alone writes."""
    if not run.world.is_main:
        return
    if improved:
        write_checkpoint(run, run.best_path, state, resumable=False)
    write_checkpoint(run, run.last_path, state, resumable=True)
    columns = run.objective.columns
    rows = [[r.get(c, "") for c in columns] for r in state.history]
    atomic_write_csv(run.output_dir / "metrics.csv", columns, rows)


def write_run_report(
    run: Run,
    state: RunState,
    options: ReportOptions,
    source: str | None,
    *,
    progress: bool,
    cache_dir: str | Path | None,
) -> None:
    """report.html in the run folder: best.pt on the validation scans, with the training curves."""
    if not run.best_path.exists():
        return
    loaded = load_model(run.best_path, device=str(run.device), precision=run.config.train.precision)
    fraction = run.config.train.val_fraction
    source = source or f"a stratified {fraction:g} of the training data (train.val_fraction)"
    select = getattr(run.config.train, "select", "balanced_accuracy")
    training = TrainingRecord(state.history, state.best_epoch, run.output_dir, source, select)
    t = run.config.train
    loading = LoadingOptions(t.cache, cache_dir, t.num_workers, progress)
    report_after_training(loaded, run.val_set.items, training, options, loading=loading)

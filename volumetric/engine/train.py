"""The training loop: AdamW, warm-up + cosine schedule, label smoothing, gradient accumulation,
epoch validation, best/last checkpoints, metrics.csv (plus TensorBoard logs and learning_curves.png,
see run_log.py), and exact resumption.

Every epoch reseeds the global RNG (augmentation, dropout) and draws its batch order from
``(seed, epoch)``, so a run resumed from ``last.pt`` follows the same path as one never stopped.
SIGTERM or SIGINT saves a resumable ``last.pt`` after the current optimizer step (with the batch
position and RNG state inside the epoch) and stops; ``kill -9`` loses at most the current epoch.

Launched by torchrun, every process runs this same loop under DistributedDataParallel: each takes its
shard of the epoch's permutation (batch_size is per process) and of the validation set, gradients
are averaged at every optimizer step, and the validation predictions are gathered so that every
process computes the same metrics over the whole set and takes the same best-checkpoint decision.
Only rank 0 writes files. Stops are agreed: a signal to any process, or a NaN loss on any
process, stops all of them at the same step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from transforms import build_augmentation, build_preprocessing
from volumetric.config import Config, save_config
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices
from volumetric.data.sampler import EpochSampler, strided_shard
from volumetric.data.split import stratified_split
from volumetric.device import autocast, autocast_dtype, configure_cpu_allocator
from volumetric.engine.checkpoint import load_checkpoint, save_checkpoint
from volumetric.engine.distributed import (
    World,
    all_gather,
    all_reduce_max,
    all_reduce_sum,
    distributed_session,
)
from volumetric.engine.evaluate import Predictions, predict
from volumetric.engine.interrupt import StopSignals, TrainingInterrupted
from volumetric.engine.run_log import RunLog
from volumetric.engine.schedule import warmup_cosine
from volumetric.errors import VolumetricError
from volumetric.io import atomic_write_csv
from volumetric.models.registry import build_model

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_auroc",
    "seconds",
]


@dataclass
class TrainResult:
    output_dir: Path
    class_names: list[str]
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preprocessing_settings(config: Config) -> dict[str, Any]:
    """What a checkpoint must carry to preprocess a scan exactly as in training."""
    return {**asdict(config.data), "patch_size": config.model.patch_size}


def train(
    config: Config,
    train_items: list[tuple[Path, str]],
    val_items: list[tuple[Path, str]] | None,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a classifier (config.model.arch) on (path, class name) items; writes checkpoints and logs to output_dir."""
    with distributed_session(config.train.device) as (world, device):
        return _train(
            config,
            train_items,
            val_items,
            output_dir,
            resume=resume,
            progress=progress,
            world=world,
            device=device,
        )


def _agreed_signal(stop: StopSignals, world: World) -> int | None:
    """The signal that stops the run, the same on every process: a collective, called by all at once."""
    if not world.distributed:
        return stop.signum
    return int(all_reduce_max([stop.signum or 0]).item()) or None


def _validate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype | None,
    world: World,
    *,
    progress: bool,
    num_classes: int,
) -> Predictions:
    """Predictions for the whole validation set, on every process: each predicts its own shard (no
    scan twice), then the rows of all processes are gathered and put in dataset order."""
    if not world.distributed:
        return predict(model, loader, device, dtype, progress=progress, desc="validate")
    if len(loader.sampler):
        mine = predict(model, loader, device, dtype, progress=progress, desc="validate")
        probs, labels, indices = (
            mine.probs,
            mine.labels,
            mine.indices,
        )  # (n_r, num_classes), (n_r,), (n_r,)
        loss_sum = mine.loss * len(labels)
    else:  # more processes than validation scans: this one has none
        probs, labels, indices = torch.zeros(0, num_classes), *torch.zeros(2, 0, dtype=torch.int64)
        loss_sum = 0.0
    indices = torch.cat(all_gather(indices.to(torch.int64)))  # (N,)
    order = indices.argsort()
    probs = torch.cat(all_gather(probs.float()))[order]  # (N, num_classes)
    labels = torch.cat(all_gather(labels.to(torch.int64)))[order]  # (N,)
    loss = all_reduce_sum([loss_sum]).item() / max(len(order), 1)
    return Predictions(probs=probs, labels=labels, indices=indices[order], loss=loss)


def _train(
    config: Config,
    train_items: list[tuple[Path, str]],
    val_items: list[tuple[Path, str]] | None,
    output_dir: str | Path,
    *,
    resume: bool,
    progress: bool,
    world: World,
    device: torch.device,
) -> TrainResult:
    """One process's part of `train`: the whole run when alone, a DDP replica under torchrun."""
    t = config.train
    output_dir = Path(output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    if last_path.exists() and not resume:
        raise VolumetricError(
            f"{output_dir} already holds a run (last.pt); pass --resume or choose another --output-dir"
        )
    if resume and not last_path.exists():
        raise VolumetricError(f"{last_path}: nothing to resume")

    class_names = sorted({label for _, label in train_items})
    if len(class_names) < 2:
        raise VolumetricError(
            f"training data has {len(class_names)} class ({class_names}); at least 2 are needed"
        )
    train_pairs = class_indices(train_items, class_names, "training data")
    if val_items is not None:
        val_pairs = class_indices(val_items, class_names, "validation data")
    else:
        train_idx, val_idx = stratified_split([y for _, y in train_pairs], t.val_fraction, t.seed)
        val_pairs = [train_pairs[i] for i in val_idx]
        train_pairs = [train_pairs[i] for i in train_idx]
    if config.data.target_shape is None and t.batch_size > 1:
        raise VolumetricError(
            "train.batch_size must be 1 when data.target_shape is empty (each scan keeps its own size); "
            "set data.target_shape to batch scans"
        )
    log.info(
        "classes %s: %d training and %d validation scans",
        class_names,
        len(train_pairs),
        len(val_pairs),
    )

    dtype = autocast_dtype(device, t.precision)
    if device.type == "cpu":
        configure_cpu_allocator(
            memory_saving=config.model.grad_checkpointing or config.model.memory_lean
        )
    seed_everything(t.seed)
    preprocess = build_preprocessing(asdict(config.data), config.model.patch_size)
    train_set = ScanDataset(
        train_pairs,
        preprocess,
        augment=build_augmentation(config.augment),
        cache=t.cache,
        in_channels=config.model.in_channels,
    )
    val_set = ScanDataset(
        val_pairs, preprocess, cache=t.cache, in_channels=config.model.in_channels
    )
    loader_args = dict(
        batch_size=t.batch_size,
        num_workers=t.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=t.num_workers > 0,
    )
    # every process draws the same permutation per epoch and takes its own shard of it
    sampler = EpochSampler(len(train_set), t.seed, num_replicas=world.size, rank=world.rank)
    # loaders draw their workers' base seeds from their own generators, not from the global RNG that
    # augmentation uses, so that creating an iterator does not shift the augmentation of a resumed run
    train_loader = DataLoader(
        train_set, sampler=sampler, generator=torch.Generator().manual_seed(t.seed), **loader_args
    )
    val_loader = DataLoader(
        val_set,
        sampler=strided_shard(len(val_set), world.rank, world.size),
        generator=torch.Generator(),
        **loader_args,
    )
    batches_per_epoch = math.ceil(len(sampler) / t.batch_size)  # of this process

    model_args = {"num_classes": len(class_names), **asdict(config.model)}
    model = build_model(model_args).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norm weights
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
    )
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = max(1, round(t.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    # run state; `partial` is the unfinished epoch a signal interrupted: batches done, loss sums, RNG
    start_epoch, step, history, best, best_epoch, partial = (
        0,
        0,
        [],
        [-math.inf, -math.inf],
        0,
        None,
    )
    if resume:
        state = load_checkpoint(last_path, map_location=device)
        if state["class_names"] != class_names or state["model_args"] != model_args:
            raise VolumetricError(
                f"{last_path}: the run was started with other classes or model settings"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        best, best_epoch, partial = state["best_score"], state["best_epoch"], state.get("partial")
        saved_world = state.get("world_size", 1)
        if saved_world != world.size:
            # an optimizer step covers world.size × batch_size scans: put the schedule where the same
            # share of the training is done with this many processes (the step count goes on as it is)
            share = start_epoch + (
                partial["batch"] * t.batch_size * saved_world / len(train_set) if partial else 0.0
            )
            scheduler.last_epoch = round(share * steps_per_epoch) - 1
            scheduler.step()
            log.info(
                "the run used %d process(es), this one %d: schedule moved to step %d of %d",
                saved_world,
                world.size,
                scheduler.last_epoch,
                total_steps,
            )
        log.info(
            "resuming %s after epoch %d%s",
            output_dir,
            start_epoch,
            f", batch {partial['batch']}" if partial else "",
        )
    train_model: nn.Module = (
        model  # what the training step calls; `model` itself is saved and validated
    )
    if (
        world.distributed
    ):  # wraps after loading last.pt: DDP starts every process from rank 0's weights
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    checkpoint_meta = dict(
        model_args=model_args,
        class_names=class_names,
        preprocessing=preprocessing_settings(config),
        config=config.to_dict(),
    )

    def training_state(epochs_done: int, partial_epoch: dict | None = None) -> dict:
        return dict(
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epochs_done,
            step=step,
            history=history,
            best_score=best,
            best_epoch=best_epoch,
            partial=partial_epoch,
            world_size=world.size,
        )

    # TensorBoard (OUTPUT_DIR/tensorboard/) and learning_curves.png: the one place the run log is created
    with (
        StopSignals() as stop,
        RunLog(output_dir, start_step=step, enabled=world.is_main) as run_log,
    ):
        for epoch in range(start_epoch, t.epochs):
            started = time.perf_counter()
            sampler.epoch = epoch
            if partial is not None:  # continue the interrupted epoch exactly where it stopped
                saved_world = partial.get("world_size", 1)
                same_world = saved_world == world.size
                # the epoch's first items, over all processes, are done; the loss sums saved are totals over them
                sampler.start = partial["batch"] * t.batch_size * saved_world
                done = partial["batch"] if same_world else 0
                loss_sum, seen = (
                    (partial["loss_sum"], partial["seen"]) if world.is_main else (0.0, 0)
                )
                elapsed = partial["seconds"]
                rngs = partial.get("rngs") or [partial["rng"]]  # one RNG state per process
                if same_world:
                    torch.set_rng_state(rngs[world.rank])
                else:  # another number of processes: the rest of the epoch gets a fresh draw
                    torch.manual_seed(
                        (t.seed + world.rank) * 100_003 + epoch + 7919 * sampler.start
                    )
                partial = None
            else:
                sampler.start, done, loss_sum, seen, elapsed = 0, 0, 0.0, 0, 0.0
                # augmentation and dropout of this epoch, different on each process
                torch.manual_seed((t.seed + world.rank) * 100_003 + epoch)
            epoch_batches = done + math.ceil(
                len(sampler) / t.batch_size
            )  # this process's batches in this epoch
            model.train()
            optimizer.zero_grad(set_to_none=True)
            bar = tqdm(
                train_loader,
                desc=f"epoch {epoch + 1}/{t.epochs}",
                disable=not (progress and world.is_main),
                leave=False,
            )
            for batch in bar:
                images = batch["image"].to(device, non_blocking=True)  # (B, C, W, H, D)
                labels = batch["label"].to(device)  # (B,)
                stepping = (done + 1) % t.grad_accum_steps == 0 or done + 1 >= epoch_batches
                # DDP averages gradients in the backward of the batch that steps, not in those accumulated before
                with train_model.no_sync() if world.distributed and not stepping else nullcontext():
                    with autocast(device, dtype):
                        logits = train_model(images)  # (B, num_classes)
                    loss = criterion(logits.float(), labels)
                    value = loss.item()
                    # a NaN on any process makes the sum NaN: all processes stop at the same batch
                    agreed = all_reduce_sum([value]).item() if world.distributed else value
                    if not math.isfinite(agreed):
                        kept = (
                            f"{last_path} holds the last good state"
                            if last_path.exists()
                            else "no checkpoint was saved yet"
                        )
                        bad = value if not math.isfinite(value) else agreed
                        raise VolumetricError(
                            f"training loss became {bad} at epoch {epoch + 1}, step {step}; stopped. "
                            f"{kept} (lower train.lr, or check the scans)"
                        )
                    scaler.scale(loss / t.grad_accum_steps).backward()
                loss_sum += value * len(labels)
                seen += len(labels)
                done += 1
                if not stepping:
                    continue  # accumulate more batches before the optimizer step
                if t.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                run_log.log_step(step, value)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
                signum = _agreed_signal(stop, world)
                if signum is not None and done < epoch_batches:
                    elapsed += time.perf_counter() - started
                    totals = all_reduce_sum([loss_sum, seen])  # over all processes
                    rngs = [
                        state[0] for state in all_gather(torch.get_rng_state()[None])
                    ]  # one per process
                    partial_epoch = dict(
                        batch=done,
                        loss_sum=totals[0].item(),
                        seen=int(totals[1].item()),
                        seconds=elapsed,
                        rng=rngs[0],
                        rngs=rngs,
                        world_size=world.size,
                    )
                    if world.is_main:
                        resumable = training_state(epoch, partial_epoch)
                        save_checkpoint(last_path, model=model, **checkpoint_meta, **resumable)
                    # no process exits before last.pt is written: torchrun would stop the writer with it
                    all_reduce_sum([0])
                    raise TrainingInterrupted(
                        f"stopped by signal {signum} in epoch {epoch + 1} after {done} batches; "
                        f"{last_path} saved, continue with --resume",
                        signum,
                    )

            loss_sum, seen = all_reduce_sum(
                [loss_sum, seen]
            ).tolist()  # mean over the scans of all processes
            row: dict[str, float] = {
                "epoch": epoch + 1,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": loss_sum / max(seen, 1),
            }
            val_metrics: dict[str, float] = {}
            if len(val_set):
                val_metrics = _validate(
                    model,
                    val_loader,
                    device,
                    dtype,
                    world,
                    progress=progress and world.is_main,
                    num_classes=len(class_names),
                ).metrics()
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
            row["seconds"] = elapsed + time.perf_counter() - started
            history.append(row)
            log.info(
                "epoch %d/%d  %s",
                epoch + 1,
                t.epochs,
                "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "step")),
            )

            # best: highest validation balanced accuracy, then lowest loss (without validation: the last epoch)
            score = (
                [val_metrics["balanced_accuracy"], -val_metrics["loss"]]
                if val_metrics
                else [epoch, 0.0]
            )
            improved = (
                score > best
            )  # the same on every process: all computed it from the same gathered rows
            if improved:
                best, best_epoch = score, epoch + 1
            if world.is_main:  # the only process that writes files
                if improved:
                    save_checkpoint(
                        best_path, model=model, **checkpoint_meta, **training_state(epoch + 1)
                    )
                save_checkpoint(
                    last_path, model=model, **checkpoint_meta, **training_state(epoch + 1)
                )
                atomic_write_csv(
                    output_dir / "metrics.csv",
                    METRIC_COLUMNS,
                    [[r.get(c, "") for c in METRIC_COLUMNS] for r in history],
                )
                run_log.log_epoch(history)
            # a collective: rank 0 reaches it only with its files written, so no process leaves before that
            signum = _agreed_signal(stop, world)
            if signum is not None:
                raise TrainingInterrupted(
                    f"stopped by signal {signum} after epoch {epoch + 1}; {last_path} saved, continue with --resume",
                    signum,
                )

    return TrainResult(output_dir, class_names, best_epoch, history[best_epoch - 1], history)

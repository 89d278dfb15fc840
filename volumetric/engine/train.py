"""The training loop: AdamW, warm-up + cosine schedule, label smoothing, gradient accumulation,
epoch validation, best/last checkpoints, metrics.csv, and exact resumption.

Every epoch reseeds the global RNG (augmentation, dropout) and draws its batch order from
``(seed, epoch)``, so a run resumed from ``last.pt`` follows the same path as one never stopped.
SIGTERM or SIGINT saves a resumable ``last.pt`` after the current optimizer step (with the batch
position and RNG state inside the epoch) and stops; ``kill -9`` loses at most the current epoch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from transforms import build_augmentation, build_preprocessing
from volumetric.config import Config, save_config
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices
from volumetric.data.sampler import EpochSampler
from volumetric.data.split import stratified_split
from volumetric.device import autocast, autocast_dtype, configure_cpu_allocator, resolve_device
from volumetric.engine.checkpoint import load_checkpoint, save_checkpoint
from volumetric.engine.evaluate import predict
from volumetric.engine.interrupt import StopSignals, TrainingInterrupted
from volumetric.engine.schedule import warmup_cosine
from volumetric.errors import VolumetricError
from volumetric.io import atomic_write_csv
from volumetric.models.vit3d import VolumeTransformer

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy",
                  "val_auroc", "seconds"]  # fmt: skip


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
    """Train a VolumeTransformer on (path, class name) items; writes checkpoints and logs to output_dir."""
    t = config.train
    output_dir = Path(output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    if last_path.exists() and not resume:
        raise VolumetricError(f"{output_dir} already holds a run (last.pt); pass --resume or choose another --output-dir")
    if resume and not last_path.exists():
        raise VolumetricError(f"{last_path}: nothing to resume")

    class_names = sorted({label for _, label in train_items})
    if len(class_names) < 2:
        raise VolumetricError(f"training data has {len(class_names)} class ({class_names}); at least 2 are needed")
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
    log.info("classes %s: %d training and %d validation scans", class_names, len(train_pairs), len(val_pairs))

    device = resolve_device(t.device)
    dtype = autocast_dtype(device, t.precision)
    if device.type == "cpu":
        configure_cpu_allocator(memory_saving=config.model.grad_checkpointing or config.model.memory_lean)
    seed_everything(t.seed)
    preprocess = build_preprocessing(asdict(config.data), config.model.patch_size)
    train_set = ScanDataset(train_pairs, preprocess, augment=build_augmentation(config.augment), cache=t.cache,
                            in_channels=config.model.in_channels)  # fmt: skip
    val_set = ScanDataset(val_pairs, preprocess, cache=t.cache, in_channels=config.model.in_channels)
    loader_args = dict(batch_size=t.batch_size, num_workers=t.num_workers, pin_memory=device.type == "cuda",
                       persistent_workers=t.num_workers > 0)  # fmt: skip
    sampler = EpochSampler(len(train_set), t.seed)
    # loaders draw their workers' base seeds from their own generators, not from the global RNG that
    # augmentation uses, so that creating an iterator does not shift the augmentation of a resumed run
    train_loader = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(t.seed), **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, generator=torch.Generator(), **loader_args)
    batches_per_epoch = math.ceil(len(train_set) / t.batch_size)

    model_args = {"num_classes": len(class_names), **asdict(config.model)}
    model = VolumeTransformer(**model_args).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr
    )
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = max(1, round(t.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    # run state; `partial` is the unfinished epoch a signal interrupted: batches done, loss sums, RNG
    start_epoch, step, history, best, best_epoch, partial = 0, 0, [], [-math.inf, -math.inf], 0, None
    if resume:
        state = load_checkpoint(last_path, map_location=device)
        if state["class_names"] != class_names or state["model_args"] != model_args:
            raise VolumetricError(f"{last_path}: the run was started with other classes or model settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        best, best_epoch, partial = state["best_score"], state["best_epoch"], state.get("partial")
        log.info("resuming %s after epoch %d%s", output_dir, start_epoch,
                 f", batch {partial['batch']}" if partial else "")  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    checkpoint_meta = dict(model_args=model_args, class_names=class_names,
                           preprocessing=preprocessing_settings(config), config=config.to_dict())  # fmt: skip

    def training_state(epochs_done: int, partial_epoch: dict | None = None) -> dict:
        return dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    epoch=epochs_done, step=step, history=history, best_score=best, best_epoch=best_epoch,
                    partial=partial_epoch)  # fmt: skip

    with StopSignals() as stop:
        for epoch in range(start_epoch, t.epochs):
            started = time.perf_counter()
            sampler.epoch = epoch
            if partial is not None:  # continue the interrupted epoch exactly where it stopped
                sampler.start = partial["batch"] * t.batch_size
                done, loss_sum, seen, elapsed = partial["batch"], partial["loss_sum"], partial["seen"], partial["seconds"]
                torch.set_rng_state(partial["rng"])
                partial = None
            else:
                sampler.start, done, loss_sum, seen, elapsed = 0, 0, 0.0, 0, 0.0
                torch.manual_seed(t.seed * 100_003 + epoch)  # augmentation and dropout of this epoch
            model.train()
            optimizer.zero_grad(set_to_none=True)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not progress, leave=False)
            for batch in bar:
                images = batch["image"].to(device, non_blocking=True)  # (B, C, W, H, D)
                labels = batch["label"].to(device)  # (B,)
                with autocast(device, dtype):
                    logits = model(images)  # (B, num_classes)
                loss = criterion(logits.float(), labels)
                if not torch.isfinite(loss):
                    kept = f"{last_path} holds the last good state" if last_path.exists() else "no checkpoint was saved yet"
                    raise VolumetricError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, step {step}; stopped. "
                        f"{kept} (lower train.lr, or check the scans)"
                    )
                scaler.scale(loss / t.grad_accum_steps).backward()
                loss_sum += loss.item() * len(labels)
                seen += len(labels)
                done += 1
                if done % t.grad_accum_steps and done < batches_per_epoch:
                    continue  # accumulate more batches before the optimizer step
                if t.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                if stop.signum is not None and done < batches_per_epoch:
                    elapsed += time.perf_counter() - started
                    partial_epoch = dict(batch=done, loss_sum=loss_sum, seen=seen, seconds=elapsed,
                                         rng=torch.get_rng_state())  # fmt: skip
                    save_checkpoint(last_path, model=model, **checkpoint_meta, **training_state(epoch, partial_epoch))
                    raise TrainingInterrupted(
                        f"stopped by signal {stop.signum} in epoch {epoch + 1} after {done} batches; "
                        f"{last_path} saved, continue with --resume",
                        stop.signum,
                    )

            row: dict[str, float] = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                                     "train_loss": loss_sum / max(seen, 1)}  # fmt: skip
            val_metrics: dict[str, float] = {}
            if len(val_set):
                val_metrics = predict(model, val_loader, device, dtype, progress=progress, desc="validate").metrics()
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
            row["seconds"] = elapsed + time.perf_counter() - started
            history.append(row)
            log.info("epoch %d/%d  %s", epoch + 1, t.epochs,
                     "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "step")))  # fmt: skip

            # best: highest validation balanced accuracy, then lowest loss (without validation: the last epoch)
            score = [val_metrics["balanced_accuracy"], -val_metrics["loss"]] if val_metrics else [epoch, 0.0]
            improved = score > best
            if improved:
                best, best_epoch = score, epoch + 1
                save_checkpoint(best_path, model=model, **checkpoint_meta, **training_state(epoch + 1))
            save_checkpoint(last_path, model=model, **checkpoint_meta, **training_state(epoch + 1))
            atomic_write_csv(output_dir / "metrics.csv", METRIC_COLUMNS,
                             [[r.get(c, "") for c in METRIC_COLUMNS] for r in history])  # fmt: skip
            if stop.signum is not None:
                raise TrainingInterrupted(
                    f"stopped by signal {stop.signum} after epoch {epoch + 1}; {last_path} saved, continue with --resume",
                    stop.signum,
                )

    return TrainResult(output_dir, class_names, best_epoch, history[best_epoch - 1], history)

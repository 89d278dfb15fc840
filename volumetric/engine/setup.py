"""Setting up a training run: classes and split, data sets and loaders, model and optimizer.

`set_up` gathers in one `Run` everything the loop in train.py works with, built in an order
that keeps the random streams fixed: the global RNG is seeded, and nothing draws from it before
the model's weights are initialized, so the same seed gives the same initial model whatever the
data set, cache or number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torchio as tio
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from volumetric.checkpoint import load_checkpoint
from volumetric.config import Config
from volumetric.data.cache import disk_cache_for
from volumetric.data.dataset import ScanDataset
from volumetric.data.discovery import class_indices
from volumetric.data.guard import select_series
from volumetric.data.loading import available_cpus, loader_options, resolve_workers
from volumetric.data.preflight import screen
from volumetric.data.sampler import (
    BalancedEpochSampler,
    EpochKeys,
    EpochSampler,
    strided_shard,
)
from volumetric.data.series_filter import SeriesFilter
from volumetric.data.source import Entry, ScanSource
from volumetric.data.split import hash_groups, stratified_split
from volumetric.device import autocast, autocast_dtype
from volumetric.engine.decide import check_decision_settings
from volumetric.engine.distributed import World, all_gather_objects
from volumetric.engine.finetune import freeze_blocks, load_initial_weights
from volumetric.engine.objective import Classification, Objective
from volumetric.engine.schedule import warmup_cosine
from volumetric.errors import VolumetricError
from volumetric.layers.patch_embed import as_triple
from volumetric.models.registry import architecture, build_model, model_arguments
from volumetric.transforms import build_augmentation, build_preprocessing

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One process's part of a training run: settings, data, model and optimization."""

    config: Config
    world: World
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: float32
    output_dir: Path
    class_names: list[str]
    arch: str
    model_args: dict[str, Any]
    train_set: ScanDataset
    val_set: ScanDataset
    sampler: EpochSampler
    train_loader: Iterable  # a DataLoader (or what train()'s loader_hook wrapped it in)
    val_loader: DataLoader
    model: nn.Module  # what is saved and validated
    train_model: nn.Module  # what the training step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module | None  # the classification loss; None when the objective has its own
    objective: Objective  # what is optimized and how epochs are judged (engine/objective.py)
    epochs: int  # the run's length
    steps_per_epoch: int
    total_steps: int
    data_summary: dict[str, Any]  # dataset_summary.json (volumetric/data/preflight.py)
    split: list[tuple[Entry, str]] = field(default_factory=list)  # split.csv: (scan, role)
    training_groups: dict[str, Any] | None = None  # hashed groups of the training split
    lineage: dict[str, Any] | None = None  # where the starting weights came from (--init)
    pretraining: dict[str, Any] | None = None  # a pretraining run's record (engine/pretrain.py)

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """best.pt of a classifier; pretrained.pt of a pretraining run."""
        return self.output_dir / self.objective.best_name

    @property
    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint of the run carries besides the weights (volumetric/checkpoint.py)."""
        return dict(
            arch=self.arch,
            model_args=self.model_args,
            class_names=self.class_names,
            preprocessing=preprocessing_settings(self.config),
            config=self.config.to_dict(),
            training_groups=self.training_groups,
            lineage=self.lineage,
            pretraining=self.pretraining,
            modalities=sorted(m for m in self.data_summary.get("modality", {}) if m != "unknown"),
        )

    def batches_remaining(self) -> int:
        """This process's batches from the sampler's current start to the end of the epoch."""
        return math.ceil(len(self.sampler) / self.config.train.batch_size)

    def epoch_seed(self, epoch: int) -> int:
        """The seed of this process's global RNG at the start of ``epoch`` (augmentation,
        dropout, drop path): different on each process, the same for a resumed run."""
        return (self.config.train.seed + self.world.rank) * 100_003 + epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)


def preprocessing_settings(config: Config) -> dict[str, Any]:
    """What a checkpoint must carry to preprocess a scan exactly as in training (the data section
    less what decides which scans train and which files make a scan, not how one is
    preprocessed; the checkpoint's config keeps those)."""
    skipped = ("on_bad_scan", "channels", "series_filter")  # which scans, not how
    data = {k: v for k, v in asdict(config.data).items() if k not in skipped}
    if data.get("ct_stats") is None:  # only ct_dataset has them: other caches keep their keys
        data.pop("ct_stats", None)
    return {**data, "patch_size": config.model.patch_size}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_up(
    config: Config,
    train_items: list[Entry],
    val_items: list[Entry] | None,
    output_dir: Path,
    world: World,
    device: torch.device,
    *,
    resume: bool,
    cache_dir: Path | None = None,
) -> Run:
    """Check the run folder and the data, then build data sets, loaders, model and optimizer."""
    check_run_folder(output_dir, resume)
    init = None if resume else config.train.init  # a resumed run's weights come from last.pt
    initial = load_checkpoint(init) if init else None  # read now: a wrong file fails at once
    series_filter = SeriesFilter.from_config(config.data.series_filter)
    train_items, left_out = select_series(series_filter, train_items)
    if val_items is not None:
        val_items, more = select_series(series_filter, val_items)
        left_out.update(more)
    class_names, train_pairs, val_pairs, split = split_data(config, train_items, val_items)
    check_decision_settings(config, class_names, len(val_pairs))
    train_pairs, val_pairs, summary = screen_data(
        config, class_names, train_pairs, val_pairs, world, cache_dir
    )
    summary["left_out_series"] = left_out  # by data.series_filter, with why
    seed_everything(config.train.seed)
    data = data_loaders(config, train_pairs, val_pairs, world, device, cache_dir)
    arch = config.model.arch
    check_training_input(arch, config.train.batch_size, len(data["sampler"]), summary)
    model_args = model_arguments(arch, asdict(config.model), len(class_names))
    model = build_model(arch, model_args)  # the first draw from the seeded global RNG
    if initial is not None:
        assert init is not None  # initial was read from it
        load_initial_weights(model, arch, class_names, initial, init)
    freeze_blocks(model, config.train.freeze_blocks)
    return assemble(
        config,
        world,
        device,
        output_dir,
        model=model,
        data=data,
        epochs=config.train.epochs,
        objective=Classification(select=config.train.select),
        criterion=build_criterion(config, [y for _, y in train_pairs], class_names),
        class_names=class_names,
        arch=arch,
        model_args=model_args,
        data_summary=summary,
        split=split,
        training_groups=training_group_hashes(split),
        lineage=initial.lineage_record() if initial is not None else None,
    )


def assemble(
    config: Config,
    world: World,
    device: torch.device,
    output_dir: Path,
    *,
    model: nn.Module,
    data: dict[str, Any],
    epochs: int,
    criterion: nn.Module | None,
    lr_parts: bool = True,
    **fields: Any,
) -> Run:
    """The Run of ``model`` on ``data`` (as `data_loaders` gives it) for ``epochs``: the model on its
    device, the autocast type, the optimizer and schedule; ``fields``: the rest of `Run`'s.
    ``lr_parts``: learning rates per part of a classifier (`parameter_groups`); False: one for
    all."""
    model = model.to(device)
    steps_per_epoch = math.ceil(
        math.ceil(len(data["sampler"]) / config.train.batch_size) / config.train.grad_accum_steps
    )
    dtype = autocast_dtype(device, config.train.precision)
    return Run(
        config=config,
        world=world,
        device=device,
        dtype=dtype,
        output_dir=output_dir,
        model=model,
        train_model=model,  # wrapped by `distribute` once the weights are final
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
        criterion=criterion.to(device) if criterion is not None else None,
        **data,
        **_optimization(model, config, steps_per_epoch, epochs, device, dtype, lr_parts),
        **fields,
    )


def check_training_input(
    arch: str, batch_size: int, scans_per_epoch: int, summary: dict[str, Any]
) -> None:
    """The architecture's own check of what it trains on (`ArchitectureSpec.check_input`): every
    batch size an epoch has, and the smallest preprocessed scan of the pre-flight; its ValueError
    becomes a one-line VolumetricError naming the architecture."""
    spec = architecture(arch)
    shape = (summary.get("preprocessed_shape") or {}).get("min")
    if spec.check_input is None or not shape:
        return
    sizes = {min(batch_size, scans_per_epoch)}
    if scans_per_epoch % batch_size:
        sizes.add(scans_per_epoch % batch_size)  # the epoch's last, partial batch
    try:
        spec.check_input(sizes, tuple(shape[-3:]))
    except ValueError as error:
        raise VolumetricError(f"model.arch={arch}: {error}") from None


def balanced_class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """n_samples / (n_classes * n_class) for each class, from the training labels: (num_classes,).
    Every class then carries the same share of the loss; a class without items gets weight 0."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes)
    weights = len(labels) / (num_classes * counts.to(torch.float32).clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def build_criterion(config: Config, labels: list[int], class_names: list[str]) -> nn.Module:
    """The training loss: cross-entropy with label smoothing, weighted per class when
    ``train.class_weights`` is balanced (so train_loss is the weighted loss being optimized).
    The validation loss (evaluation/predict.py) stays plain cross-entropy, unweighted and
    unsmoothed, so that val_loss compares across runs whatever the class weights."""
    t = config.train
    weight = None
    if t.class_weights == "balanced":
        weight = balanced_class_weights(labels, len(class_names))
        shown = ", ".join(f"{name} {w:.3f}" for name, w in zip(class_names, weight.tolist()))
        log.info("class weights of the training loss: %s", shown)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=t.label_smoothing)


def distribute(run: Run) -> None:
    """Under torchrun, train through DistributedDataParallel. Called after a resume has loaded
    last.pt: DDP starts every process from rank 0's weights."""
    if run.world.distributed:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.train_model = DistributedDataParallel(run.model, device_ids=device_ids)


def check_run_folder(output_dir: Path, resume: bool) -> None:
    last = output_dir / "last.pt"
    if last.exists() and not resume:
        raise VolumetricError(
            f"{output_dir} already holds a run (last.pt); pass --resume or choose another --output-dir"
        )
    if resume and not last.exists():
        raise VolumetricError(f"{last}: nothing to resume")


def split_data(
    config: Config, train_items: list[Entry], val_items: list[Entry] | None
) -> tuple[
    list[str],
    list[tuple[ScanSource, int]],
    list[tuple[ScanSource, int]],
    list[tuple[Entry, str]],
]:
    """Class names (sorted), training and validation (scan source, class index) pairs, and the split as
    (entry, role "train" or "validation") rows for split.csv. Without ``val_items``, a seeded
    stratified split of the training items that keeps each group whole (volumetric/data/split.py)."""
    t = config.train
    # training entries are labelled (read_manifest's labelled=True)
    class_names = sorted({cast(str, item.label) for item in train_items})
    if len(class_names) < 2:
        raise VolumetricError(
            f"training data has {len(class_names)} class ({class_names}); at least 2 are needed"
        )
    train_pairs = class_indices(train_items, class_names, "training data")
    if val_items is not None:
        val_pairs = class_indices(val_items, class_names, "validation data")
        split = [(e, "train") for e in train_items] + [(e, "validation") for e in val_items]
        in_both = {e.group for e in train_items} & {e.group for e in val_items} - {None}
        shared = cast("set[str]", in_both)  # None taken out
        if shared:
            log.warning(
                "%d group(s) have scans in both the training and the validation data (e.g. %s)",
                len(shared),
                ", ".join(sorted(shared)[:3]),
            )
    else:
        labels, groups = [y for _, y in train_pairs], [e.group for e in train_items]
        train_idx, val_idx = stratified_split(
            labels, t.val_fraction, t.seed, groups=groups, class_names=class_names
        )
        val_pairs = [train_pairs[i] for i in val_idx]
        train_pairs = [train_pairs[i] for i in train_idx]
        split = [(train_items[i], "train") for i in train_idx]
        split += [(train_items[i], "validation") for i in val_idx]
    if config.data.target_shape is None and t.batch_size > 1:
        raise VolumetricError(
            "train.batch_size must be 1 when data.target_shape is empty (each scan keeps its own "
            "size); set data.target_shape to batch scans"
        )
    log.info(
        "classes %s: %d training and %d validation scans%s",
        class_names,
        len(train_pairs),
        len(val_pairs),
        _group_counts(split),
    )
    return class_names, train_pairs, val_pairs, split


def _group_counts(split: list[tuple[Entry, str]]) -> str:
    """The log's ' (G training and H validation groups)' when the data names groups, else ''."""
    if all(entry.group is None for entry, _ in split):
        return ""
    counts = [
        len({e.group if e.group is not None else i for i, (e, r) in enumerate(split) if r == role})
        for role in ("train", "validation")
    ]
    return f" ({counts[0]} training and {counts[1]} validation groups)"


def training_group_hashes(split: list[tuple[Entry, str]]) -> dict[str, Any] | None:
    """What checkpoints record of the training split's groups (salted hashes, see
    volumetric/data/split.py); None when the data names no groups."""
    groups = [entry.group for entry, role in split if role == "train" and entry.group is not None]
    return hash_groups(groups) if groups else None


def screen_data(
    config: Config,
    class_names: list[str],
    train_pairs: list[tuple[ScanSource, int]],
    val_pairs: list[tuple[ScanSource, int]],
    world: World,
    cache_dir: Path | None,
) -> tuple[list[tuple[ScanSource, int]], list[tuple[ScanSource, int]], dict[str, Any]]:
    """Pre-flight over every training and validation scan before the first step (each process
    checks its share); with ``data.on_bad_scan: skip`` the bad ones are left out, and a class
    left without training scans is an error."""
    pairs = train_pairs + val_pairs
    roles = ["train"] * len(train_pairs) + ["validation"] * len(val_pairs)
    keep, summary = screen(
        _dataset(config, pairs, cache_dir),
        roles,
        class_names,
        policy=config.data.on_bad_scan,
        patch_size=as_triple(config.model.patch_size, "patch_size"),
        spacing=config.data.spacing,
        target_shape=config.data.target_shape,
        # nothing else runs yet: the pre-flight shares every CPU among the processes of the run
        # (train.num_workers: 0 keeps it in the main process)
        workers=resolve_workers(config.train.num_workers)
        and max(1, available_cpus() // world.size),
        rank=world.rank,
        size=world.size,
        gather=all_gather_objects,
    )
    kept = set(keep)
    train_kept = [p for i, p in enumerate(train_pairs) if i in kept]
    val_kept = [p for i, p in enumerate(val_pairs, start=len(train_pairs)) if i in kept]
    missing = sorted(set(class_names) - {class_names[y] for _, y in train_kept})
    if missing:
        raise VolumetricError(f"no usable training scan is left of class(es) {missing}")
    return train_kept, val_kept, summary


def _dataset(
    config: Config,
    pairs: list[tuple[ScanSource, int]],
    cache_dir: Path | None,
    augment: tio.Transform | None = None,
) -> ScanDataset:
    """A data set of ``pairs`` with the run's preprocessing and cache."""
    t, channels = config.train, config.model.in_channels
    settings = preprocessing_settings(config)
    disk = disk_cache_for(t.cache, cache_dir, settings, channels)
    preprocess = build_preprocessing(settings, config.model.patch_size)
    return ScanDataset(
        pairs,
        preprocess,
        augment=augment,
        cache=t.cache,
        disk_cache=disk,
        in_channels=channels,
        seed=t.seed,
    )


def data_loaders(
    config: Config,
    train_pairs: list[tuple[ScanSource, int]],
    val_pairs: list[tuple[ScanSource, int]],
    world: World,
    device: torch.device,
    cache_dir: Path | None,
) -> dict[str, Any]:
    """Data sets, the training sampler and both loaders (as `Run` fields)."""
    t = config.train
    train_set = _dataset(config, train_pairs, cache_dir, build_augmentation(config.augment))
    val_set = _dataset(config, val_pairs, cache_dir)
    options = loader_options(resolve_workers(t.num_workers), pin_memory=device.type == "cuda")
    # every process draws the same order per epoch (a permutation, or with train.sampler: balanced
    # class-balanced draws with replacement) and takes its own shard of it
    shards = dict(num_replicas=world.size, rank=world.rank)
    sampler: EpochSampler
    if t.sampler == "balanced":
        sampler = BalancedEpochSampler([y for _, y in train_pairs], t.seed, **shards)
    else:
        sampler = EpochSampler(len(train_set), t.seed, **shards)
    # loaders draw their workers' base seeds from their own generators, not from the global RNG
    # that dropout uses, so that creating an iterator does not shift a resumed run
    train_loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        sampler=EpochKeys(sampler),
        generator=torch.Generator().manual_seed(t.seed),
        **options,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=t.batch_size,
        sampler=strided_shard(len(val_set), world.rank, world.size),
        generator=torch.Generator(),
        **options,
    )
    return dict(
        train_set=train_set,
        val_set=val_set,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
    )


def _optimization(
    model: nn.Module,
    config: Config,
    steps_per_epoch: int,
    epochs: int,
    device: torch.device,
    dtype: torch.dtype | None,
    lr_parts: bool,
) -> dict[str, Any]:
    """AdamW (no weight decay on biases and norm weights; with ``lr_parts`` learning rates per
    part, see `parameter_groups`), warm-up + cosine schedule over the run, fp16 scaler."""
    t = config.train
    scale = _lr_scale(model, config) if lr_parts else (lambda name: 1.0)
    optimizer = torch.optim.AdamW(parameter_groups(model, t.lr, t.weight_decay, scale), lr=t.lr)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, round(t.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, scale: Callable[[str], float]
) -> list[dict[str, Any]]:
    """The trainable parameters in AdamW groups: weight decay on matrices and kernels, none on
    biases and norm weights, and the learning rate ``lr × scale(name)``. With every scale 1 these
    are the two groups of a plain run (so a last.pt of one resumes with any version)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = {n: scale(n) for n, _ in named}
    groups = []
    for factor in sorted(set(scales.values()) | {1.0}, reverse=True):
        for decay in (True, False):
            params = [p for n, p in named if scales[n] == factor and (p.ndim >= 2) == decay]
            if params or factor == 1.0:  # the plain run's two groups, even empty
                groups.append(
                    {
                        "params": params,
                        "weight_decay": weight_decay if decay else 0.0,
                        "lr": lr * factor,
                    }
                )
    return groups


def _lr_scale(model: nn.Module, config: Config) -> Callable[[str], float]:
    """The learning-rate factor of each parameter of a classifier, by name: 1 for the head;
    ``train.encoder_lr_scale`` for the rest (the encoder: a fine-tuned one moves less than its
    new head); for a model of blocks, further ``train.layer_decay`` to the power of the number of
    layers above it (patch embedding layer 0, block i layer i + 1, final norm depth + 1: the
    earliest layers, the most general features, move least; BEiT's layer-wise decay)."""
    t = config.train
    head = architecture(config.model.arch).head_prefix
    depth = len(getattr(model, "blocks", ()))

    def layer(name: str) -> int:
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    def scale(name: str) -> float:
        if name.startswith(head):
            return 1.0
        return t.encoder_lr_scale * t.layer_decay ** (depth + 1 - layer(name))

    return scale

"""Pretraining on unlabeled scans: masked-volume modeling (volumetric/models/mae.py) with the
training loop of train.py.

`pretrain` reads every scan of the inputs (folders searched at any depth, scan files, DICOM series,
manifests whose only column is the path), holds ``pretrain.held_out`` of them out for a validation
loss and the pictures, and trains a `MaskedVolumeModel` around the VolumeTransformer the config's
model section describes: the same pre-flight, disk cache, loading workers, augmentation,
schedule, signals, exact resume, torchrun, TensorBoard and metrics.csv as `volumetric-train`,
with `MaskedModeling` as the run's objective. The run folder gets

    pretrained.pt        the encoder (a vit3d without a head) of the epoch of lowest validation
                         loss: start a classifier from it with ``volumetric-train --init``
    last.pt              encoder and decoder, optimizer and run state (``--resume``)
    reconstructions.png  held-out scans: original, masked input, reconstruction, three planes
    report.html          the loss curves and the reconstructions on one page

The masks are a pure function of (seed, epoch, scan): the scan's key is its source (path, and
series UID for DICOM), so a resumed or distributed run hides the same patches as one that never
stopped; the validation masks use a fixed epoch key, the same every epoch.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from volumetric.atomic_files import atomic_write_bytes, atomic_write_text
from volumetric.config import Config
from volumetric.data.discovery import Unusable, inference_inputs
from volumetric.data.guard import select_series
from volumetric.data.loading import batches
from volumetric.data.series_filter import SeriesFilter
from volumetric.data.source import Entry, ScanSource
from volumetric.data.split import stratified_split
from volumetric.engine.distributed import all_reduce_sum, distributed_session
from volumetric.engine.setup import (
    assemble,
    check_run_folder,
    check_training_input,
    data_loaders,
    screen_data,
    seed_everything,
)
from volumetric.engine.train import RunState, fit
from volumetric.errors import VolumetricError
from volumetric.models.mae import MaskedVolumeModel, token_mask
from volumetric.models.registry import architecture, model_arguments
from volumetric.models.vit3d import VolumeTransformer

if TYPE_CHECKING:
    from volumetric.engine.setup import Run

log = logging.getLogger(__name__)

PSEUDO_CLASS = "unlabeled"
"""The one class name the pre-flight and the split see: pretraining scans carry no label."""
VALIDATION_EPOCH = -1
"""The epoch key of the validation masks: the same patches are hidden at every epoch."""
COLUMNS = ["epoch", "step", "lr", "train_loss", "val_loss", "seconds"]


def masked_model(run: Run) -> MaskedVolumeModel:
    """The run's model: a pretraining run trains a `MaskedVolumeModel`."""
    return cast(MaskedVolumeModel, run.model)


@dataclass(frozen=True)
class MaskedModeling:
    """The objective of a pretraining run: the reconstruction error of the hidden patches."""

    mask_ratio: float
    seed: int
    select = "loss"
    judged_by = "the held-out scans' reconstruction loss"
    columns = COLUMNS
    best_name = "pretrained.pt"

    def masks(self, run: Run, items: list[tuple[ScanSource, int]], indices, epoch, grid) -> Tensor:
        """(B, N) masks of the batch's scans (``indices`` into ``items``) for ``epoch``."""
        tokens = math.prod(grid)
        keys = [str(items[int(i)][0]) for i in indices]
        masks = [token_mask(self.seed, epoch, key, tokens, self.mask_ratio) for key in keys]
        return torch.stack(masks).to(run.device)

    def _loss(self, run: Run, model: nn.Module, batch, items, epoch) -> tuple[Tensor, int]:
        images = batch["image"].to(run.device, non_blocking=True)  # (B, C, W, H, D)
        grid = masked_model(run).encoder.patch_embed.grid(images.shape[2:])
        masks = self.masks(run, items, batch["index"], epoch, grid)  # (B, N)
        with run.autocast():
            loss, _ = model(images, masks)
        return loss.float(), len(images)

    def loss(self, run: Run, batch: dict[str, Any], epoch: int) -> tuple[Tensor, int]:
        return self._loss(run, run.train_model, batch, run.train_set.items, epoch)

    @torch.no_grad()
    def validate(self, run: Run, *, progress: bool) -> dict[str, float]:
        """The mean reconstruction loss of the held-out scans (each process its shard, summed)."""
        run.model.eval()
        loss_sum, seen = 0.0, 0
        for batch in batches(run.val_loader):
            loss, scans = self._loss(run, run.model, batch, run.val_set.items, VALIDATION_EPOCH)
            loss_sum, seen = loss_sum + loss.item() * scans, seen + scans
        if run.world.distributed:
            loss_sum, seen = all_reduce_sum([loss_sum, seen]).tolist()
        return {"loss": loss_sum / max(seen, 1)}

    def score(self, row: dict[str, float]) -> list[float]:
        loss = row.get("val_loss")
        if loss is None:
            return [row["epoch"], 0.0]
        return [-loss if math.isfinite(loss) else -math.inf, 0.0]

    def saved_model(self, run: Run, *, resumable: bool) -> nn.Module:
        """last.pt: the whole model (encoder and decoder); pretrained.pt: the encoder alone."""
        return run.model if resumable else masked_model(run).encoder


def pretraining_entries(
    inputs: Sequence[str | Path], config: Config
) -> tuple[list[Entry], list[str]]:
    """The scans of ``inputs`` (folders at any depth, files, DICOM series, manifests with a path
    column; labels ignored) as entries of the pseudo-class, and the inputs that gave none (an
    error, or with ``data.on_bad_scan: skip`` a warning each)."""
    found = inference_inputs(inputs, channels=config.data.channels)
    problems = [item.error for item in found if isinstance(item, Unusable)]
    series_filter = SeriesFilter.from_config(config.data.series_filter)
    sources = [s for s in found if not isinstance(s, Unusable)]
    kept, _ = select_series(series_filter, [Entry(s, PSEUDO_CLASS) for s in sources])
    if problems and config.data.on_bad_scan == "error":
        raise VolumetricError(problems[0] if len(problems) == 1 else f"{problems[0]} (and more)")
    for problem in problems:
        log.warning("left out: %s", problem)
    entries = kept
    if len(entries) < 2:
        raise VolumetricError(f"pretraining needs at least 2 scans, {len(entries)} found")
    return entries, problems


def set_up_pretraining(
    config: Config,
    entries: list[Entry],
    inputs: Sequence[str | Path],
    output_dir: Path,
    world,
    device: torch.device,
    *,
    resume: bool,
    cache_dir: Path | None,
) -> Run:
    """The Run of a pretraining: a seeded held-out split, the pre-flight, the data, the masked
    model around a fresh encoder, and `MaskedModeling` as the objective."""
    check_run_folder(output_dir, resume)
    arch, p = config.model.arch, config.pretrain
    if not architecture(arch).tokens:
        raise VolumetricError(
            f"pretraining needs a model of patch tokens such as vit3d, not model.arch={arch}"
        )
    pairs = [(e.source, 0) for e in entries]
    train_idx, val_idx = stratified_split([0] * len(pairs), p.held_out, config.train.seed)
    split = [(entries[i], "train") for i in train_idx] + [
        (entries[i], "validation") for i in val_idx
    ]
    train_pairs, val_pairs, summary = screen_data(
        config,
        [PSEUDO_CLASS],
        [pairs[i] for i in train_idx],
        [pairs[i] for i in val_idx],
        world,
        cache_dir,
    )
    seed_everything(config.train.seed)
    data = data_loaders(config, train_pairs, val_pairs, world, device, cache_dir)
    check_training_input(arch, config.train.batch_size, len(data["sampler"]), summary)
    model_args = model_arguments(arch, asdict(config.model), 1)
    # the first draw from the seeded RNG; a token architecture (checked above)
    encoder = cast(VolumeTransformer, architecture(arch).build(**model_args))
    model = MaskedVolumeModel(
        encoder,
        decoder_dim=p.decoder_dim,
        decoder_depth=p.decoder_depth,
        decoder_heads=p.decoder_heads,
        attention=config.model.attention,
    )
    record = {
        **asdict(p),
        "inputs": [str(i) for i in inputs],
        "run": str(output_dir),
        "training_scans": len(train_pairs),
        "held_out_scans": len(val_pairs),
    }
    return assemble(
        config,
        world,
        device,
        output_dir,
        model=model,
        data=data,
        epochs=p.epochs,
        criterion=None,
        lr_parts=False,
        objective=MaskedModeling(p.mask_ratio, config.train.seed),
        class_names=[],
        arch=arch,
        model_args=model_args,
        data_summary=summary,
        split=split,
        pretraining=record,
    )


@dataclass
class PretrainResult:
    output_dir: Path
    history: list[dict[str, float]]
    best_epoch: int


def pretrain(
    config: Config,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    entries: list[Entry] | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    report: bool = True,
) -> PretrainResult:
    """Masked-volume pretraining on the scans of ``inputs``; writes the run folder (module
    docstring). ``entries``: those scans as `pretraining_entries` found them, when the caller
    has them already (else found here). ``report``: rank 0 writes reconstructions.png and
    report.html at the end."""
    if entries is None:
        entries, _ = pretraining_entries(inputs, config)
    with distributed_session(config.train.device) as (world, device):
        run = set_up_pretraining(
            config,
            entries,
            inputs,
            Path(output_dir),
            world,
            device,
            resume=resume,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        state = fit(run, resume=resume, progress=progress)
    if report and world.is_main:
        write_pretraining_report(run, state)
    return PretrainResult(run.output_dir, state.history, state.best_epoch)


# --------------------------------------------------------------------------------- the pictures


PLANES = ("sagittal", "coronal", "axial")


@torch.no_grad()
def reconstruct(run: Run, count: int) -> list[dict[str, Any]]:
    """The first ``count`` held-out scans: their name, and original, masked input and
    reconstruction as (W, H, D) arrays (channel 0), with the validation masks."""
    from volumetric.models.mae import hide

    model = masked_model(run).eval()
    objective = cast(MaskedModeling, run.objective)
    shown = []
    for index in range(min(count, len(run.val_set))):
        item = run.val_set[index]
        if "error" in item:
            continue
        volume = item["image"][None].to(run.device)  # (1, C, W, H, D)
        grid = model.encoder.patch_embed.grid(volume.shape[2:])
        mask = objective.masks(run, run.val_set.items, [index], VALIDATION_EPOCH, grid)
        with run.autocast():
            _, prediction = model(volume, mask)
        filled = model.reconstruction(volume, mask, prediction)
        masked = hide(volume, mask, model.patch_size)
        shown.append(
            {
                "name": Path(str(run.val_set.items[index][0])).name,
                "original": volume[0, 0].float().cpu().numpy(),
                "masked": masked[0, 0].float().cpu().numpy(),
                "reconstruction": filled[0, 0].float().cpu().numpy(),
            }
        )
    return shown


def reconstruction_png(shown: list[dict[str, Any]]) -> bytes:
    """One row per scan: original, masked input and reconstruction in each of three central
    planes (nine panels), on the original's intensity range."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.5, 1.6 * max(1, len(shown)) + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(max(1, len(shown)), 9, squeeze=False)
    for row, scan in zip(axes, shown):
        low, high = np.percentile(scan["original"], [1, 99])
        for p, plane in enumerate(PLANES):
            for k, kind in enumerate(("original", "masked", "reconstruction")):
                volume = scan[kind]
                middle = volume.shape[p] // 2
                picture = np.take(volume, middle, axis=p)  # the central slice across axis p
                axis = row[3 * p + k]
                axis.imshow(np.rot90(picture), cmap="gray", vmin=low, vmax=high)
                axis.set_xticks([]), axis.set_yticks([])
                if axis in axes[0]:
                    axis.set_title(f"{plane}\n{kind}", fontsize=8)
        row[0].set_ylabel(scan["name"], fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def write_pretraining_report(run: Run, state: RunState) -> None:
    """reconstructions.png and report.html (loss curves, the reconstructions) in the run folder,
    from pretrained.pt's weights (the epoch of lowest validation loss)."""
    from volumetric.checkpoint import load_checkpoint
    from volumetric.evaluation.report_html import image, number, page, section, table

    if run.best_path.exists():
        masked_model(run).encoder.load_state_dict(load_checkpoint(run.best_path).weights)
    png = reconstruction_png(reconstruct(run, run.config.pretrain.pictures))
    atomic_write_bytes(run.output_dir / "reconstructions.png", png)
    rows = [
        ([str(int(r["epoch"])), number(r["train_loss"]), number(r.get("val_loss"))], "")
        for r in state.history
    ]
    curves = run.output_dir / "learning_curves.png"
    record = run.pretraining or {}
    parts = [
        f"<h1>Pretraining: {run.output_dir.name}</h1>",
        section(
            "run",
            "The run",
            table(
                None,
                [
                    ([k, str(v)], "")
                    for k, v in [
                        (
                            "scans (training, held out)",
                            f"{record.get('scans')}, {record.get('held_out')}",
                        ),
                        ("mask ratio", record.get("mask_ratio")),
                        ("epochs", run.epochs),
                        ("pretrained.pt", f"epoch {state.best_epoch} (lowest validation loss)"),
                    ]
                ],
            ),
        ),
        section(
            "reconstructions",
            "What it learnt",
            image(
                png,
                "reconstructions",
                "wide",
                "held-out scans: original, input with the "
                "hidden patches blanked, reconstruction; the hidden patches are shown at their "
                "own mean and spread (the model predicts their normalized voxels)",
            ),
        ),
        section(
            "curves",
            "Loss",
            image(curves.read_bytes(), "learning curves", "wide") if curves.exists() else "",
            table(["epoch", "training loss", "validation loss"], rows),
        ),
    ]
    atomic_write_text(run.output_dir / "report.html", page("Pretraining", parts))
    log.info("reconstructions of held-out scans: %s", run.output_dir / "reconstructions.png")

"""Fine-tuning: start a run from another checkpoint's weights, and freeze the first blocks.

``volumetric-train DATA --init CHECKPOINT`` (``train.init``) copies every weight of the checkpoint
into the new model, except the classification head when the classes differ: the head then keeps
its fresh initialization. The position embedding is computed from each scan's token grid, not
learned, so the checkpoint may come from scans of any size. ``train.freeze_blocks: K`` keeps the
patch embedding and the first K Transformer blocks as they are (no gradient, no weight decay);
the later blocks, the final norm and the head train.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volumetric.checkpoint import Checkpoint
from volumetric.errors import VolumetricError
from volumetric.layers.patch_embed import as_triple
from volumetric.models.registry import architecture
from volumetric.models.vit3d import FORM_OPTIONS

log = logging.getLogger(__name__)


def load_initial_weights(
    model: nn.Module,
    arch: str,
    class_names: list[str],
    checkpoint: Checkpoint,
    init: str | Path,
) -> None:
    """Copy the weights of ``checkpoint`` (loaded from ``init`` by `load_checkpoint`) into
    ``model`` (an ``arch`` for ``class_names``); a VolumetricError when the architectures differ
    in anything but the head."""
    if checkpoint.arch != arch:
        raise VolumetricError(
            f"{init}: --init checkpoint is a {checkpoint.arch} model, this run trains {arch}"
        )
    new_head = checkpoint.class_names != list(class_names)
    source, target = checkpoint.weights, model.state_dict()
    head = architecture(arch).head_prefix
    copied = {}
    for key, value in target.items():
        if key not in source or (new_head and key.startswith(head)):
            continue
        if source[key].shape != value.shape:
            raise VolumetricError(
                f"{init}: --init checkpoint does not fit this model: {key} is "
                f"{tuple(source[key].shape)} there, {tuple(value.shape)} here (same "
                "model.embed_dim, depth, num_heads, mlp_ratio, patch_size and in_channels needed)"
            )
        copied[key] = source[key]
    model.load_state_dict(copied, strict=False)
    fresh = sorted(set(target) - set(copied))
    log.info(
        "initialized from %s: %d of %d tensors copied%s",
        init,
        len(copied),
        len(target),
        f"; kept fresh: {', '.join(fresh)}" if fresh else "",
    )
    if new_head:
        log.info(
            "new classification head: classes %s here, %s in %s",
            class_names,
            checkpoint.class_names,
            init,
        )


def freeze_blocks(model: nn.Module, count: int) -> None:
    """Stop gradients into the patch embedding and the first ``count`` blocks of a ViT."""
    if count == 0:
        return
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise VolumetricError(
            f"train.freeze_blocks needs a vit3d model, this one is a {type(model).__name__}"
        )
    if count > len(blocks):
        raise VolumetricError(
            f"train.freeze_blocks={count}, but the model has {len(blocks)} blocks"
        )
    for module in [model.patch_embed, *blocks[:count]]:
        module.requires_grad_(False)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("frozen: patch embedding and blocks 0-%d (%d of %d weights)", count - 1, frozen, total)


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


ARCHITECTURE_KEYS = (
    "arch",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "attention",
    "seqnorm_affine",
    "layer_scale",
    "attention_norm",
    "stem",
    "stem_norm",
    "in_channels",
)
"""The model keys that shape the weights or what they mean: a run started from a checkpoint
takes them from it."""


def model_section_from_init(model: dict[str, Any], init: Checkpoint) -> dict[str, Any]:
    """The config's model section as the user wrote it (``model``, before defaults), completed
    with the architecture of the checkpoint a run starts from: every `ARCHITECTURE_KEYS` key
    the user did not set takes the checkpoint's value, so that ``--init RUN/pretrained.pt``
    needs no config to match it. A key the user set to another value is a VolumetricError
    naming it (the weights would not fit)."""
    theirs = {**init.model_args, "arch": init.arch}
    same = {k: v for k, v in theirs.items() if k in ARCHITECTURE_KEYS}
    # a form option at null ("the kind's default") is not set: the checkpoint's value is taken
    model = {k: v for k, v in model.items() if not (k in FORM_OPTIONS and v is None)}
    differ = [k for k, v in same.items() if k in model and not _same_value(k, model[k], v)]
    if differ:
        mine = ", ".join(f"model.{k}={model[k]!r}" for k in differ)
        there = ", ".join(f"{k}={same[k]!r}" for k in differ)
        raise VolumetricError(
            f"{init.path}: the --init checkpoint's model has {there}, the config sets {mine}; "
            "leave them out to take the checkpoint's"
        )
    return {**model, **{k: v for k, v in same.items() if k not in model}}


def _same_value(key: str, a: Any, b: Any) -> bool:
    """Config values compared as the model sees them (a patch of 8 is [8, 8, 8])."""
    if key == "patch_size":
        return as_triple(a, key) == as_triple(b, key)
    return a == b

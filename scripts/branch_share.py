#!/usr/bin/env python
"""How much each block's attention branch adds to the residual stream of a freshly initialized
model: the measurement behind the choice of the default seq-norm form (docs/method.md).

    python scripts/branch_share.py DATA_FOLDER [--config configs/demo_regions.yaml] [--scans 4]
        [--seed 0] [--form NAME KEY=VALUE ...]

For each form (a name and model overrides; by default the forms of docs/results.md's screen),
the model is built as `volumetric-train` would build it with ``--train.seed`` (the same initial
weights), the first ``--scans`` scans of the folder are preprocessed as in training, and for
every block the ratio ‖branch‖ / ‖stream‖ is reported: the attention branch's output as added to
the residual stream (after the LayerScale, where there is one) against the stream it is added
to, Frobenius norms over the scan's tokens, median over the scans; then the same ratio token by
token in the first block (median, 99th percentile and largest over the tokens): whether a few
tokens get a branch as large as themselves.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from volumetric.layers.block import Block
    from volumetric.models.vit3d import VolumeTransformer

FORMS: dict[str, list[str]] = {  # every option written out: the defaults may change
    "seqnorm, plain": ["model.attention=seqnorm", "model.attention_norm=false"],
    "seqnorm_qk": ["model.attention=seqnorm_qk"],
    "softmax": ["model.attention=softmax"],
    "affine": [
        "model.attention=seqnorm",
        "model.attention_norm=false",
        "model.seqnorm_affine=true",
    ],
    "layer_scale": [
        "model.attention=seqnorm",
        "model.attention_norm=false",
        "model.layer_scale=0.1",
    ],
    "attention_norm (the default)": ["model.attention=seqnorm", "model.attention_norm=true"],
}


def attention_branch(block: Block, x: torch.Tensor) -> torch.Tensor:
    """What ``block`` adds to the stream x (1, N, C) through attention, as Block.forward adds it."""
    return block.ls1(block.attn(block.norm1(x)))  # (1, N, C)


def branch_shares(model: VolumeTransformer, volume: torch.Tensor) -> list[float]:
    """‖attention branch‖ / ‖residual stream‖ for each block of a VolumeTransformer on one
    volume (1, C_in, W, H, D): what the block adds in x + branch, against x."""
    shares: list[float] = []
    x = model.embed(volume)  # (1, N, C)
    with torch.no_grad():
        for block in model.blocks:
            branch = attention_branch(cast("Block", block), x)  # (1, N, C)
            shares.append(float(branch.norm() / x.norm()))
            x = block(x)
    return shares


def first_block_token_shares(model: VolumeTransformer, volume: torch.Tensor) -> torch.Tensor:
    """‖branch_i‖ / ‖x_i‖ for every token i of the first block (N,): how evenly the attention
    branch is spread over the tokens (a share above 1 overwrites the token it is added to)."""
    with torch.no_grad():
        x = model.embed(volume)  # (1, N, C)
        branch = attention_branch(cast("Block", model.blocks[0]), x)  # (1, N, C)
    return (branch.norm(dim=-1) / x.norm(dim=-1))[0]  # (N,)


def main(argv: Sequence[str] | None = None) -> int:
    from volumetric.config import apply_overrides, config_from_dict, load_config
    from volumetric.data.dataset import load_subject
    from volumetric.data.discovery import discover
    from volumetric.engine.setup import preprocessing_settings, seed_everything
    from volumetric.models.registry import build_model, model_arguments
    from volumetric.transforms import build_preprocessing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--config", default="configs/demo_regions.yaml")
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--form", nargs="+", action="append", metavar="NAME KEY=VALUE")
    args = parser.parse_args(argv)
    forms = {name: overrides for name, *overrides in args.form} if args.form else FORMS

    base = load_config(args.config)
    entries = discover(args.data)[: args.scans]
    blocks, tokens = [], []
    for name, overrides in forms.items():
        config = config_from_dict(apply_overrides(base.to_dict(), [f"--{o}" for o in overrides]))
        preprocess = build_preprocessing(preprocessing_settings(config), config.model.patch_size)
        seed_everything(args.seed)
        arguments = model_arguments("vit3d", asdict(config.model), 4)
        model = cast("VolumeTransformer", build_model("vit3d", arguments).eval())
        per_scan, per_token = [], []
        for entry in entries:
            volume = load_subject(entry.source, preprocess).image.data.float()[None]
            per_scan.append(branch_shares(model, volume))
            shares = first_block_token_shares(model, volume)  # (N,)
            q = torch.quantile(shares, torch.tensor([0.5, 0.99]))
            per_token.append([float(q[0]), float(q[1]), float(shares.max())])
        blocks.append((name, [statistics.median(block) for block in zip(*per_scan)]))
        tokens.append((name, [statistics.median(column) for column in zip(*per_token)]))

    print("Whole scan, ‖branch‖ / ‖stream‖ by block (median over the scans)\n")
    print("| form | " + " | ".join(f"block {i + 1}" for i in range(base.model.depth)) + " |")
    print("|---|" + "---:|" * base.model.depth)
    for name, medians in blocks:
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
    print("\nToken by token in block 1, ‖branch_i‖ / ‖x_i‖ (median over the scans)\n")
    print("| form | median token | 99th percentile | largest | largest / median |")
    print("|---|---:|---:|---:|---:|")
    for name, (median, p99, largest) in tokens:
        print(f"| {name} | {median:.3f} | {p99:.3f} | {largest:.3f} | {largest / median:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

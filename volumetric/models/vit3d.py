"""VolumeTransformer: a 3D ViT that classifies whole CT/MRI volumes.

    volume (B, C_in, W, H, D) ──PatchEmbed3d──▶ tokens (B, N, C) + 3D sin-cos position embedding
      ──▶ depth × Block (pre-norm; per-block gradient checkpointing when enabled)
      ──▶ LayerNorm ──▶ pool over tokens (mean, or max) ──▶ Linear ──▶ logits (B, num_classes)

With the default ``attention="seqnorm"`` (queries, keys and values sequence-normalized;
``seqnorm_qk`` and ``sima`` are the other linear kinds) every block is linear in N, so a whole 256³
scan in 8³ patches (32,768 tokens) is an ordinary input. By default ``seqnorm`` also normalizes
the attention output (a LayerNorm before the output projection), without which it does not train
from scratch on every task (`FORM_DEFAULTS`; docs/method.md#the-default-form). ``seqnorm_affine``
adds a learnable per-feature scale and shift after the normalization
(docs/method.md#sequence-normalization).

Pooling: ``pool="mean"`` (this constructor's default; the config's is ``max``) suits findings spread
over the scan; a small focal finding (a lesion, a nodule) is 1/N of a mean, so its signal and its
gradient are diluted by the N − 1 other tokens, and it is learnt far faster with ``pool="max"``,
where the strongest token decides (measured on the demo data:
docs/results.md#mean-against-max-pooling; docs/method.md#the-model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from volumetric.layers.attention import ATTENTION, supports_affine
from volumetric.layers.block import Block
from volumetric.layers.patch_embed import (
    STEM_NORMS,
    STEMS,
    ConvStem3d,
    as_triple,
    build_stem,
    check_conv_stem_patch,
)
from volumetric.layers.pos_embed import sincos_pos_embed_3d

POOLS = ("mean", "max")

FORM_OPTIONS = ("seqnorm_affine", "attention_norm")
"""Options of the attention's form whose value ``None`` means "the attention kind's default"."""

FORM_DEFAULTS: dict[str, dict[str, bool]] = {"seqnorm": {"attention_norm": True}}
"""The default form of each attention kind (off where a kind has no entry). ``seqnorm`` trains from
scratch on every demo task only with one of the stabilizers, the attention-output LayerNorm chosen
on the validation screens (docs/method.md#the-default-form); ``softmax`` stays the standard
reference ViT and ``seqnorm_qk``, ``sima`` the published forms."""


def resolve_form(attention: str, **options: bool | None) -> dict[str, bool | None]:
    """``options`` (of `FORM_OPTIONS`) with each ``None`` replaced by ``attention``'s default.

    Checkpoints store the resolved values, so a default that changes later does not change a
    saved model; other values (a bad one included) pass through for the checks to name."""
    defaults = FORM_DEFAULTS.get(attention, {})
    return {k: defaults.get(k, False) if v is None else v for k, v in options.items()}


def check_model_arguments(
    *,
    in_channels: int,
    patch_size: int | tuple[int, int, int] | list[int],
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    attention: str,
    dropout: float,
    pool: str,
    seqnorm_affine: bool | None,
    stem: str,
    layer_scale: float | None,
    drop_path: float,
    attention_norm: bool | None,
    stem_norm: str = "instance",
    num_classes: int = 2,
) -> None:
    """Raise a ValueError, starting with the argument's name, for any value VolumeTransformer cannot use.

    Shared by the model and by `Config.validate`, so that a bad config fails before any data is read
    (before the classes are known: ``num_classes`` is then left at a valid placeholder). The
    defaults are VolumeTransformer's; this check has none of its own to drift from them.
    """
    for name, value in [
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("embed_dim", embed_dim),
        ("depth", depth),
        ("num_heads", num_heads),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    patch = as_triple(patch_size, "patch_size")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    if embed_dim < 6:
        raise ValueError(
            f"embed_dim={embed_dim} must be at least 6 (3D sin-cos position embedding)"
        )
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not one of {sorted(ATTENTION)}")
    for name, flag in [("seqnorm_affine", seqnorm_affine), ("attention_norm", attention_norm)]:
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(
                f"{name} must be true, false or null (the attention kind's default), got {flag!r}"
            )
    seqnorm_affine = resolve_form(attention, seqnorm_affine=seqnorm_affine)["seqnorm_affine"]
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if stem == "conv":
        check_conv_stem_patch(patch)
    if stem_norm not in STEM_NORMS:
        raise ValueError(f"stem_norm={stem_norm!r} is not one of {STEM_NORMS}")
    if layer_scale is not None and not (
        isinstance(layer_scale, (int, float))
        and not isinstance(layer_scale, bool)
        and layer_scale > 0
    ):
        raise ValueError(
            f"layer_scale must be a positive number or null (off), got {layer_scale!r}"
        )
    if not (isinstance(drop_path, (int, float)) and 0.0 <= drop_path < 1.0):
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    if seqnorm_affine and not supports_affine(attention):
        kinds = sorted(name for name in ATTENTION if supports_affine(name))
        raise ValueError(
            f"seqnorm_affine=True needs a sequence-normalized attention {kinds}, "
            f"not attention={attention!r}"
        )


class VolumeTransformer(nn.Module):
    """Whole-volume classifier; every argument is keyword-only and checked (ValueError names it).

    ``seqnorm_affine`` and ``attention_norm`` left at ``None`` take the attention kind's default
    form (`FORM_DEFAULTS`: the attention-output LayerNorm for ``seqnorm``, nothing for the rest)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        patch_size: int | tuple[int, int, int] = 8,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        attention: str = "seqnorm",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
        memory_lean: bool = False,
        pool: str = "mean",
        seqnorm_affine: bool | None = None,
        stem: str = "patch",
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        attention_norm: bool | None = None,
        stem_norm: str = "instance",
    ):
        super().__init__()
        form = resolve_form(attention, seqnorm_affine=seqnorm_affine, attention_norm=attention_norm)
        seqnorm_affine, attention_norm = form["seqnorm_affine"], form["attention_norm"]
        check_model_arguments(
            num_classes=num_classes,
            in_channels=in_channels,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            attention=attention,
            dropout=dropout,
            pool=pool,
            seqnorm_affine=seqnorm_affine,
            stem=stem,
            layer_scale=layer_scale,
            drop_path=drop_path,
            attention_norm=attention_norm,
            stem_norm=stem_norm,
        )
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.pool = pool
        self.patch_embed = build_stem(
            stem,
            patch_size=as_triple(patch_size, "patch_size"),
            in_channels=in_channels,
            embed_dim=embed_dim,
            norm=stem_norm,
        )
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                attention=attention,
                dropout=dropout,
                memory_lean=memory_lean,
                seqnorm_affine=bool(seqnorm_affine),
                attention_norm=bool(attention_norm),
                layer_scale=layer_scale,
                drop_path=drop_path * i / max(1, depth - 1),  # stochastic depth grows with depth
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes)
        self.apply(_init_weights)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.patch_embed.patch_size

    def embed(self, x: Tensor) -> Tensor:
        """(B, C_in, W, H, D) → the tokens entering the first block (B, N, C): patch embedding plus the
        position embedding of the grid ``self.patch_embed.grid(x.shape[2:])``, token n = (i·h + j)·d + k."""
        if (
            self.grad_checkpointing
            and torch.is_grad_enabled()
            and isinstance(self.patch_embed, ConvStem3d)
        ):  # its full-resolution activations are recomputed in backward, not kept
            tokens, grid = checkpoint(self.patch_embed, x, use_reentrant=False)  # (B, N, C)
        else:
            tokens, grid = self.patch_embed(x)  # (B, N, C)
        return tokens + sincos_pos_embed_3d(grid, self.embed_dim, device=x.device).to(tokens.dtype)

    def forward_blocks(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, C) from `embed` → normalized tokens (B, N, C) after every block."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, W, H, D) → normalized tokens (B, N, C)."""
        return self.forward_blocks(self.embed(x))

    def forward_head(self, tokens: Tensor) -> Tensor:
        """(B, N, C) → logits (B, num_classes): mean or max over tokens, then a linear layer."""
        pooled = tokens.amax(dim=1) if self.pool == "max" else tokens.mean(dim=1)  # (B, C)
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

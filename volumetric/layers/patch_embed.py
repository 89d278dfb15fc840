"""Tokenizers: a volume (B, C_in, W, H, D) → tokens (B, N, C) on the grid (W/p, H/p, D/p).

Two stems reach the same grid, token n = (i·h + j)·d + k, so that everything after them (the
position embedding, relevance maps on the scan's grid, masking) is the same for both:

    patch   one Conv3d with kernel = stride = patch: each token is a linear map of its own cube
            (a ViT's patch embedding)
    conv    a short stack of stride-2 3×3×3 convolutions, each followed by a normalization and
            GELU, then a 1×1×1 projection to the width (Xiao et al., "Early convolutions help
            transformers see better", 2021; the hybrid stems of medical ViTs): a token sees its
            cube and a margin around it through nonlinear filters, so a finding smaller than a
            patch is not averaged away by one linear map (docs/method.md#the-model)

The conv stem's normalization (``stem_norm``):

    instance  each channel over the whole volume (GroupNorm with one group per channel): the
              contrast between voxels stays, a bright finding's response stays larger than the
              background's noise. The default.
    channel   each voxel over its channels (LayerNorm): every voxel's features come out of one
              size, so background noise is as loud as anatomy and a finding's contrast is gone;
              on the demo's regions task the stem then memorized the training scans and stayed
              at chance on validation (docs/results.md). Kept for checkpoints of format 4 and
              earlier, which were all trained with it.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEMS = ("patch", "conv")
STEM_NORMS = ("instance", "channel")


def as_triple(value: int | tuple[int, int, int] | list[int], name: str) -> tuple[int, int, int]:
    """Accept an int or three ints (W, H, D); anything else is a ValueError naming ``name``."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(t, int) and t > 0 for t in triple):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return triple


def check_conv_stem_patch(patch_size: tuple[int, int, int]) -> None:
    """The conv stem halves the grid per stride-2 convolution: each patch side a power of two."""
    if any(p & (p - 1) for p in patch_size):
        raise ValueError(
            f"stem='conv' needs every patch_size side to be a power of two (1, 2, 4, 8, ...), "
            f"got {patch_size}; stem='patch' takes any size"
        )


class PatchEmbed3d(nn.Module):
    """Conv3d with kernel = stride = patch: (B, C_in, W, H, D) → tokens (B, N, C) and grid (w, h, d)."""

    def __init__(self, *, patch_size: int | tuple[int, int, int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = as_triple(patch_size, "patch_size")
        self.in_channels = in_channels
        self.proj = nn.Conv3d(
            in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )

    def grid(self, spatial: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
        """Token grid for a volume of the given (W, H, D); a ValueError unless each is a patch multiple."""
        if (
            len(spatial) != 3
            or any(s % p for s, p in zip(spatial, self.patch_size))
            or min(spatial) <= 0
        ):
            raise ValueError(
                f"volume size {tuple(spatial)} must be a positive multiple of patch_size {self.patch_size} "
                "on every axis (crop or pad it, e.g. with volumetric.transforms.build_preprocessing)"
            )
        return tuple(s // p for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def project(self, x: Tensor) -> Tensor:
        """(B, C_in, W, H, D) → (B, C, w, h, d)."""
        return self.proj(x)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a volume batch (B, {self.in_channels}, W, H, D), got {tuple(x.shape)}"
            )
        grid = self.grid(x.shape[2:])
        tokens = self.project(x)  # (B, C, w, h, d)
        return tokens.flatten(2).transpose(1, 2), grid  # (B, N = w·h·d, C)


class ChannelNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of each voxel of (B, C, W, H, D): the ``channel`` stem norm.
    It depends on neither the batch nor the rest of the scan, but it scales every voxel's feature
    vector to one size, which throws away the voxel's contrast (see the module's docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(
            x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps
        ).movedim(-1, 1)


def stem_norm(kind: str, channels: int) -> nn.Module:
    """The conv stem's normalization of (B, C, W, H, D) named ``kind`` (one of ``STEM_NORMS``).
    GroupNorm with C groups is instance normalization with a learnable affine and no running
    statistics, so training and evaluation compute the same thing at any batch size."""
    if kind not in STEM_NORMS:
        raise ValueError(f"stem_norm={kind!r} is not one of {STEM_NORMS}")
    return nn.GroupNorm(channels, channels) if kind == "instance" else ChannelNorm3d(channels)


class ConvStem3d(PatchEmbed3d):
    """Stride-2 3×3×3 convolutions (+ the ``norm`` named in ``STEM_NORMS`` + GELU) down to the patch
    grid, then a 1×1×1 projection to ``embed_dim``: the same (B, N, C) tokens and grid as
    `PatchEmbed3d`.

    A patch side p takes log2(p) halvings: with patch 8, three convolutions of widths C/4, C/2, C
    (C = ``embed_dim``; at least 8 channels each); an axis whose side is smaller stops being
    halved earlier (stride 1 there). Patch 1 is the projection alone.
    """

    def __init__(
        self,
        *,
        patch_size: int | tuple[int, int, int],
        in_channels: int,
        embed_dim: int,
        norm: str = "instance",
    ):
        nn.Module.__init__(self)
        self.patch_size = as_triple(patch_size, "patch_size")
        self.in_channels = in_channels
        check_conv_stem_patch(self.patch_size)
        halvings = [p.bit_length() - 1 for p in self.patch_size]  # log2 of each side
        steps = max(halvings)
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(steps):
            out = max(8, embed_dim >> (steps - 1 - i))  # …, C/4, C/2, C
            stride = cast("tuple[int, int, int]", tuple(2 if h > i else 1 for h in halvings))
            layers += [
                nn.Conv3d(width, out, kernel_size=3, stride=stride, padding=1, bias=False),
                stem_norm(norm, out),
                nn.GELU(),
            ]
            width = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv3d(width, embed_dim, kernel_size=1)

    def project(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x))  # (B, C, w, h, d)


def build_stem(
    stem: str,
    *,
    patch_size: int | tuple[int, int, int],
    in_channels: int,
    embed_dim: int,
    norm: str = "instance",
) -> PatchEmbed3d:
    """The tokenizer named ``stem`` (one of ``STEMS``); ``norm`` is the conv stem's."""
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if stem == "conv":
        return ConvStem3d(
            patch_size=patch_size, in_channels=in_channels, embed_dim=embed_dim, norm=norm
        )
    return PatchEmbed3d(patch_size=patch_size, in_channels=in_channels, embed_dim=embed_dim)

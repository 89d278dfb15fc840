"""3D patch embedding: non-overlapping cubes of voxels → one token each."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def as_triple(value: int | tuple[int, int, int] | list[int], name: str) -> tuple[int, int, int]:
    """Accept an int or three ints (W, H, D); anything else is a ValueError naming ``name``."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(t, int) and t > 0 for t in triple):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return triple  # type: ignore[return-value]


class PatchEmbed3d(nn.Module):
    """Conv3d with kernel = stride = patch: (B, C_in, W, H, D) → tokens (B, N, C) and grid (w, h, d)."""

    def __init__(self, *, patch_size: int | tuple[int, int, int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = as_triple(patch_size, "patch_size")
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

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 5 or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"expected a volume batch (B, {self.proj.in_channels}, W, H, D), got {tuple(x.shape)}"
            )
        grid = self.grid(x.shape[2:])
        tokens = self.proj(x)  # (B, C, w, h, d)
        return tokens.flatten(2).transpose(1, 2), grid  # (B, N = w·h·d, C)

"""Masked-volume modeling: a VolumeTransformer learns from unlabeled scans by filling in hidden
patches (MAE, He et al., "Masked autoencoders are scalable vision learners", 2022).

    volume (B, C, W, H, D), mask (B, N) True = hidden
      ──hide: hidden patches' voxels set to 0 (SimMIM's input masking: a convolutional stem's
        receptive field reaches into neighbouring patches, and must find nothing of them)
      ──encoder.embed──▶ tokens (B, N, C) ──keep the visible ones──▶ (B, N_vis, C)
      ──encoder.forward_blocks──▶ (B, N_vis, C)         the encoder sees no hidden token
      ──decoder: Linear to width C_d, a learned mask token at every hidden position, the position
        embedding of the grid, a few blocks, Linear to the p³·C_in voxels of each patch
      ──▶ loss: mean squared error on the hidden patches only, each target patch normalized by
        its own mean and std (MAE's "norm pix" target)

Linear attention makes the encoder's cost proportional to the visible tokens, so a quarter of a
whole volume's tokens is a quarter of the work; the decoder is narrow and shallow. After
pretraining the decoder is dropped: `volumetric-train --init` starts from the encoder.

Masks are a pure function of (seed, epoch, scan) (`token_mask`), so a resumed run, any number of
loading workers and any number of processes hide the same patches.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from volumetric.layers.block import Block
from volumetric.layers.pos_embed import sincos_pos_embed_3d
from volumetric.models.vit3d import VolumeTransformer

NORM_EPS = 1e-6
"""Added to each target patch's variance before dividing (MAE's value): a constant patch (air,
padding) becomes zeros, not a division by zero."""


def token_mask(seed: int, epoch: int, key: str, tokens: int, ratio: float) -> Tensor:
    """(tokens,) bool, True where a token is hidden: round(ratio · tokens) of them (at least one,
    and at least one left visible), chosen by a generator seeded from (seed, epoch, key) alone."""
    digest = hashlib.sha256(f"{seed}|{epoch}|{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    hidden = min(tokens - 1, max(1, round(ratio * tokens)))
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[torch.randperm(tokens, generator=generator)[:hidden]] = True
    return mask


def patchify(volume: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, W, H, D) → (B, N, pw·ph·pd·C): each token's voxels, tokens in the grid's row-major
    order (w, h, d), voxels in (pw, ph, pd, c) order."""
    b, c, *spatial = volume.shape
    w, h, d = (s // p for s, p in zip(spatial, patch))
    pw, ph, pd = patch
    x = volume.reshape(b, c, w, pw, h, ph, d, pd)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, w * h * d, pw * ph * pd * c)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """The inverse of `patchify`: (B, N, pw·ph·pd·C) on ``grid`` → (B, C, W, H, D)."""
    b = tokens.shape[0]
    (w, h, d), (pw, ph, pd) = grid, patch
    c = tokens.shape[-1] // (pw * ph * pd)
    x = tokens.reshape(b, w, h, d, pw, ph, pd, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, w * pw, h * ph, d * pd)


def hide(volume: Tensor, mask: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """``volume`` (B, C, W, H, D) with the voxels of hidden patches (``mask`` (B, N)) set to 0."""
    b, c, *spatial = volume.shape
    grid = [s // p for s, p in zip(spatial, patch)]
    keep = (~mask).to(volume.dtype).reshape(b, 1, *grid)  # (B, 1, w, h, d)
    for axis, p in zip((2, 3, 4), patch):
        keep = keep.repeat_interleave(p, dim=axis)
    return volume * keep


def normalized_patches(volume: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """The reconstruction target: `patchify`, each patch's voxels standardized by their own mean
    and (population) variance: (B, N, p³·C)."""
    target = patchify(volume, patch)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, correction=0)
    return (target - mean) / (var + NORM_EPS).sqrt()


class MaskedVolumeModel(nn.Module):
    """A VolumeTransformer ``encoder`` (its classification head removed) with an MAE decoder;
    ``forward(volume, mask)`` → loss.

    The decoder: width ``decoder_dim``, ``decoder_depth`` blocks of ``decoder_heads`` heads with
    the encoder's attention kind, and a linear prediction of each patch's voxels.
    """

    def __init__(
        self,
        encoder: VolumeTransformer,
        *,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        attention: str = "seqnorm",
    ):
        super().__init__()
        if decoder_dim < 6 or decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_dim={decoder_dim} must be at least 6 and divisible by "
                f"decoder_heads={decoder_heads}"
            )
        encoder.head = nn.Identity()  # unused here: no weights, nothing for DDP to wait for
        self.encoder = encoder
        self.decoder_dim = decoder_dim
        patch = encoder.patch_size
        in_channels = encoder.patch_embed.in_channels
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(dim=decoder_dim, num_heads=decoder_heads, attention=attention)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, math.prod(patch) * in_channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if module is not self.encoder and isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.encoder.patch_size

    def encode(self, volume: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder on the visible tokens only: (B, N_vis, C) and their indices (B, N_vis),
        ascending. Every row of ``mask`` (B, N) must hide as many tokens as the others."""
        tokens = self.encoder.embed(hide(volume, mask, self.patch_size))  # (B, N, C)
        visible = int((~mask[0]).sum())
        if bool((mask.sum(dim=1) != mask.shape[1] - visible).any()):
            raise ValueError("every scan of a batch must hide as many tokens as the others")
        keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :visible]  # (B, N_vis)
        index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self.encoder.forward_blocks(tokens.gather(1, index)), keep

    def decode(self, encoded: Tensor, keep: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Encoded visible tokens (B, N_vis, C) at ``keep`` → predicted voxels of every patch of
        ``grid``: (B, N, p³·C_in)."""
        b, n = encoded.shape[0], math.prod(grid)
        x = self.decoder_embed(encoded)  # (B, N_vis, C_d)
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()  # (B, N, C_d)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, self.decoder_dim), x)
        full = full + sincos_pos_embed_3d(grid, self.decoder_dim, device=x.device).to(x.dtype)
        for block in self.decoder_blocks:
            full = block(full)
        return self.decoder_pred(self.decoder_norm(full))

    def forward(self, volume: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(mean squared error over the hidden patches, prediction (B, N, p³·C_in)) for ``volume``
        (B, C_in, W, H, D) with ``mask`` (B, N) True = hidden."""
        grid = self.encoder.patch_embed.grid(volume.shape[2:])
        encoded, keep = self.encode(volume, mask)
        prediction = self.decode(encoded, keep, grid)  # (B, N, p³·C)
        target = normalized_patches(volume.float(), self.patch_size)
        per_token = (prediction.float() - target).square().mean(dim=-1)  # (B, N)
        hidden = mask.to(per_token.dtype)
        return (per_token * hidden).sum() / hidden.sum(), prediction

    def reconstruction(self, volume: Tensor, mask: Tensor, prediction: Tensor) -> Tensor:
        """The picture of what was learnt: visible patches as they are, hidden ones from the
        prediction brought back to each patch's own mean and std: (B, C, W, H, D)."""
        patch = self.patch_size
        grid = self.encoder.patch_embed.grid(volume.shape[2:])
        original = patchify(volume.float(), patch)  # (B, N, p³C)
        mean = original.mean(dim=-1, keepdim=True)
        std = (original.var(dim=-1, keepdim=True, correction=0) + NORM_EPS).sqrt()
        filled = torch.where(mask.unsqueeze(-1), prediction.float() * std + mean, original)
        return unpatchify(filled, grid, patch)

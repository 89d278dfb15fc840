"""Relevance maps: gradient × input on the patch tokens, mapped back onto the scan's own voxel grid.

The tokens x (1, N, C) entering the first block (patch embedding plus position embedding,
`VolumeTransformer.embed`) are compared with the tokens x⁰ of an empty scan (all zeros after the
preprocessing: the foreground mean for z-scored MRI, air for windowed CT), i.e. the conv bias plus
the position embedding. For the logit y of the explained class, the share of token n is

    s_n = Σ_c (x − x⁰)_nc · ḡ_nc,    ḡ = (1/M) Σ_{k=1..M} ∂y/∂x at x⁰ + α_k (x − x⁰)
    r_n = max(0, s_n)                one value per token on the grid (w, h, d)

With M = 1 (α = 1) this is plain gradient × input, the input being what the scan adds to the
token (x − x⁰). The default M = 16 averages the gradient along the straight path from x⁰ to x,
at the midpoints α_k = (k − ½)/M (integrated gradients, Sundararajan et al. 2017). A single
gradient is unreliable here because every block normalizes its tokens (LayerNorm): scaling a
token barely changes the output, so x · ∂y/∂x is close to zero, and of either sign, precisely
for the strong tokens of a confident prediction; the path average does not have that blind spot
(measured on synthetic scans: docs/results.md#relevance-maps-one-gradient-against-the-path).
With the path, Σ_n s_n ≈ y(x) − y(x⁰): the shares split the logit's rise from the empty scan
among the tokens (exactly as M grows, for a smooth model; max pooling converges slower).

Only the positive part is kept: the map shows where the scan speaks *for* the explained class.
The absolute value would mark evidence against it just as brightly, and a reader could not tell
the two apart. Values are in logit units, comparable within one scan.

    token map (w, h, d) ──trilinear──▶ preprocessed grid (W, H, D) = (w·pw, h·ph, d·pd)
      ──world coordinates (preprocessed affine)──▶ input grid (shape and affine of the file), linear

The preprocessed grid is the scan after `ToCanonical → Resample → intensity → CropOrPad / pad`;
its affine places it in world space, so resampling onto the file's (shape, affine) undoes the
reorientation, the resampling and the crop or pad in one step. Input voxels outside the model's
field of view (cropped away) get 0.

What the map can tell: which patches of this scan raised the logit of the explained class for
this model, relative to an empty scan. What it cannot: it is no segmentation (a finding is
blurred to whole patches, and the trilinear upsampling smooths further), the split among tokens
depends on the chosen reference and path, patches that matter only together are not told apart
from patches that matter alone, and a bright spot says what the model used, not that a finding
is really there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from volumetric.models.vit3d import VolumeTransformer

if TYPE_CHECKING:  # imported where a map is resampled: the CLI's parsers need only STEPS
    import torchio as tio


@dataclass
class RelevanceMap:
    """A relevance map on the input scan's grid, with the scan for display."""

    # (W0, H0, D0) float32 on the file's voxel grid, >= 0, 0 outside the field of view
    data: np.ndarray
    affine: np.ndarray  # (4, 4) RAS affine of the input scan, as read from the file
    scan: np.ndarray  # (W0, H0, D0) float32, the first channel of the scan as read from the file
    target: int  # the explained class


Target = int | Callable[[Tensor], int] | None
"""The class to explain: an index, a function of the logits (1, num_classes), or None (the argmax)."""


STEPS = 16
"""Gradient evaluations along the path from the empty-scan tokens to the scan's (M above); 1 = plain."""


def token_shares(
    model: VolumeTransformer, volume: Tensor, target: Target = None, steps: int = STEPS
) -> tuple[Tensor, Tensor, int]:
    """Logits, signed token shares and explained class of one volume.

    volume (1, C_in, W, H, D) → logits (1, num_classes), shares s (w, h, d) of the logit of
    ``target`` (see the module docstring), and that class. One forward pass plus ``steps`` forward
    and backward passes; gradients reach only the tokens, parameter gradients are left untouched.
    """
    if volume.shape[0] != 1:
        raise ValueError(
            f"token_shares takes one volume (1, C, W, H, D), got {tuple(volume.shape)}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    grid = model.patch_embed.grid(volume.shape[2:])  # (w, h, d)
    with torch.no_grad():
        tokens = model.embed(volume)  # (1, N, C)
        # (1, N, C): conv bias + position embedding
        reference = model.embed(torch.zeros_like(volume))
        logits = model.forward_head(model.forward_blocks(tokens))  # (1, num_classes)
    if target is None:
        target = int(logits[0].argmax())
    elif callable(target):
        target = int(target(logits))
    delta = tokens - reference  # (1, N, C): what the scan adds to each token
    gradient = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)  # (1, N, C)
    with torch.enable_grad():
        for k in range(1, steps + 1):
            # plain gradient × input, or the path's midpoints
            alpha = 1.0 if steps == 1 else (k - 0.5) / steps
            point = (reference + alpha * delta).requires_grad_(True)  # (1, N, C)
            (grad,) = torch.autograd.grad(
                model.forward_head(model.forward_blocks(point))[0, target], point
            )
            gradient += grad.float()
    shares = (delta.float() * gradient / steps).sum(dim=-1)[0]  # (N,)
    return logits, shares.reshape(grid), target  # (1, K), (w, h, d), class


def token_relevance(
    model: VolumeTransformer, volume: Tensor, target: Target = None, steps: int = STEPS
) -> tuple[Tensor, Tensor, int]:
    """Like `token_shares`, with the relevance r = max(0, s) (w, h, d) in place of the shares."""
    logits, shares, target = token_shares(model, volume, target, steps)
    return logits, shares.clamp(min=0), target


def upsample_to_voxels(relevance: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(w, h, d) token map → (W, H, D) voxel map, trilinear between token centres (a smooth map whose
    maxima sit at the centres of the most relevant patches; edge patches are held constant outward)."""
    return F.interpolate(
        relevance[None, None].float(), size=tuple(shape), mode="trilinear", align_corners=False
    )[0, 0]


def to_input_grid(
    voxels: Tensor, preprocessed_affine: np.ndarray, original: tio.ScalarImage
) -> np.ndarray:
    """A map on the preprocessed grid (W, H, D) with its affine → the original image's grid (W0, H0, D0).

    Linear interpolation in world space; input voxels the preprocessed grid does not cover get 0.
    """
    import torchio as tio

    image = tio.ScalarImage(
        tensor=voxels[None].cpu().float(), affine=np.asarray(preprocessed_affine, dtype=np.float64)
    )
    target = (
        tuple(int(s) for s in original.spatial_shape),
        np.asarray(original.affine, dtype=np.float64),
    )
    resampled = tio.Resample(target, image_interpolation="linear")(image)
    return resampled.data[0].numpy().astype(np.float32, copy=False)  # (W0, H0, D0)


def relevance_map(
    model: VolumeTransformer,
    volume: Tensor,
    preprocessed_affine: np.ndarray,
    original: tio.ScalarImage,
    target: Target = None,
    steps: int = STEPS,
) -> tuple[Tensor, RelevanceMap]:
    """Logits (1, num_classes) of the preprocessed ``volume`` (1, C_in, W, H, D) and its relevance map
    for ``target`` (default: the predicted class) on the grid of ``original``, the scan as read."""
    logits, tokens, target = token_relevance(model, volume, target, steps)
    spatial = cast("tuple[int, int, int]", volume.shape[2:])  # volume is (1, C_in, W, H, D)
    voxels = upsample_to_voxels(tokens, spatial)  # (W, H, D)
    data = to_input_grid(voxels, preprocessed_affine, original)
    scan = original.data[0].float().numpy()  # (W0, H0, D0)
    return logits, RelevanceMap(
        data=data, affine=np.asarray(original.affine, dtype=np.float64), scan=scan, target=target
    )

"""Fixed 3D sine-cosine position embedding, computed for whatever token grid a scan yields.

Being a function of the grid rather than a learned table is what lets one model run scans of any
size: training on 96³ crops and inferring on a 160×192×160 volume needs no interpolation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_pos_embed_3d(
    grid: tuple[int, int, int],
    dim: int,
    *,
    device: torch.device | None = None,
    temperature: float = 10000.0,
) -> Tensor:
    """(N, dim) embedding for a (w, h, d) grid, tokens in row-major (w, h, d) order.

    Each axis gets ``2·⌊dim/6⌋`` channels of sin/cos at geometrically spaced frequencies; the
    ``dim mod 6`` channels left over stay zero.
    """
    if dim < 6:
        raise ValueError(f"embed_dim={dim} must be at least 6 for a 3D sin-cos position embedding")
    per_axis = dim // 6  # frequencies per axis
    exponents = torch.arange(per_axis, device=device, dtype=torch.float32) / per_axis  # (F,)
    omega = 1.0 / temperature**exponents  # (F,)
    # each token's (i, j, k) from its flat index rather than a meshgrid: 1-D ops only, so that an
    # exported graph stays valid for a grid with one token along some axis (no broadcast of size 1)
    w, h, d = grid
    index = torch.arange(w * h * d, device=device)  # (N,) in row-major (w, h, d) order
    row, col = index // (h * d), index // d  # i, and i·h + j
    axes = (row, col - row * h, index - col * d)  # i, j, k: no `%`, which ONNX cannot export here
    parts = []
    for coord in axes:  # (N,) each
        angles = coord.to(torch.float32).reshape(-1, 1) * omega  # (N, F)
        parts += [angles.sin(), angles.cos()]
    embed = torch.cat(parts, dim=1)  # (N, 6F)
    return torch.nn.functional.pad(embed, (0, dim - embed.shape[1]))  # (N, dim)

"""LayerScale (Touvron et al., "Going deeper with image transformers", CaiT, 2021): a learnable
per-channel gain on a residual branch, x + γ ⊙ f(x), started small.

Started at γ = 0.1, a block first adds a tenth of what its branch computes to the residual stream
and learns how much more it needs. It matters for the sequence-normalized attention with V
normalized, whose branch starts about ten times larger than with V raw
(docs/method.md#sequence-normalization).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """x (…, C) → γ ⊙ x, γ (C,) learnable, started at ``init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

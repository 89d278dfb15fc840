"""Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

Optional, each off by default at this level (the model's defaults are set in vit3d.py):
``layer_scale``, a learnable per-channel gain started at that value on each branch (CaiT;
volumetric/layers/layer_scale.py); ``drop_path``, stochastic depth (each sample skips the branch
with that probability in training; MONAI's DropPath, which rescales by the keep probability);
``attention_norm``, a LayerNorm of the attention output before its projection (TransNormer).
"""

from __future__ import annotations

from monai.networks.layers import DropPath
from torch import Tensor, nn

from volumetric.layers.attention import build_attention
from volumetric.layers.layer_scale import LayerScale
from volumetric.layers.mlp import Mlp


class Block(nn.Module):
    """One encoder block on (B, N, C); the attention kind is looked up by name in the registry."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: str = "seqnorm",
        dropout: float = 0.0,
        memory_lean: bool = False,
        seqnorm_affine: bool = False,
        attention_norm: bool = False,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build_attention(
            attention, dim=dim, num_heads=num_heads, affine=seqnorm_affine, out_norm=attention_norm
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(
            dim=dim, hidden_dim=int(dim * mlp_ratio), dropout=dropout, memory_lean=memory_lean
        )
        self.drop = nn.Dropout(dropout)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.drop(self.attn(self.norm1(x)))))  # (B, N, C)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

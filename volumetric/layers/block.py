"""Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

from __future__ import annotations

from torch import Tensor, nn

from volumetric.layers.attention import build_attention
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
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build_attention(attention, dim=dim, num_heads=num_heads, affine=seqnorm_affine)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(
            dim=dim, hidden_dim=int(dim * mlp_ratio), dropout=dropout, memory_lean=memory_lean
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))  # (B, N, C)
        return x + self.mlp(self.norm2(x))

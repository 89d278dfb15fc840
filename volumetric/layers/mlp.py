"""Token-wise feed-forward network."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear → GELU → dropout → Linear → dropout, on (B, N, C)."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (B, N, C)

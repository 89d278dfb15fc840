"""Token-wise feed-forward network, with a memory-lean path for very long sequences.

The MLP's hidden activations are the widest tensors of a block: (N, 4C) before and after the
GELU, 4 GiB each in float32 at 2²⁰ tokens of width 256. With ``memory_lean=True`` the MLP runs
over chunks of tokens and keeps only its input for backward; backward recomputes each chunk's
hidden layer while it is still in cache. That costs one extra fc1 matmul (+11% of a block's
FLOPs) and saves 2 × (N, 4C) activations. Dropout is not applied on that path: with dropout > 0
in training the plain path runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_TOKENS = 8192
"""Tokens per chunk of the memory-lean path: (8192, 4·256) float32 hidden = 32 MiB."""


class _ChunkedMlpFn(torch.autograd.Function):
    """fc2(gelu(fc1(x))) on (M, C) rows, chunk by chunk, saving only x and the weights."""

    @staticmethod
    def forward(
        ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, chunk: int
    ) -> Tensor:
        out = x.new_empty(x.shape[0], w2.shape[0])  # (M, C)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            torch.addmm(b2, F.gelu(torch.addmm(b1, x[rows], w1.t())), w2.t(), out=out[rows])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        g = g.contiguous()
        grad_x = torch.empty_like(x)
        grad_w1, grad_b1 = torch.zeros_like(w1), torch.zeros_like(b1)
        grad_w2, grad_b2 = torch.zeros_like(w2), g.sum(dim=0)
        for start in range(0, x.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = torch.addmm(b1, x[rows], w1.t())  # (m, 4C) recomputed
            a = F.gelu(h)
            grad_w2.addmm_(g[rows].t(), a)
            grad_h = torch.ops.aten.gelu_backward(g[rows] @ w2, h)  # (m, 4C)
            grad_w1.addmm_(grad_h.t(), x[rows])
            grad_b1 += grad_h.sum(dim=0)
            torch.mm(grad_h, w1, out=grad_x[rows])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


class Mlp(nn.Module):
    """Linear → GELU → dropout → Linear → dropout, on (B, N, C)."""

    def __init__(
        self, *, dim: int, hidden_dim: int, dropout: float = 0.0, memory_lean: bool = False
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.memory_lean = memory_lean

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_lean and torch.is_grad_enabled() and not (self.training and self.drop.p > 0):
            device = x.device.type
            dtype = (
                torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            )
            params = [
                p.to(dtype)
                for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            ]
            with torch.autocast(device_type=device, enabled=False):
                rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (B·N, C)
                out = _ChunkedMlpFn.apply(rows, *params, CHUNK_TOKENS)  # (B·N, C)
            return out.view(x.shape)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (B, N, C)

"""Self-attention: softmax-free sequence-normalized attention and the softmax reference.

The method (design.md §1). Per batch element and head, with N tokens of width d:

    Q̂ = (Q − mean_N Q) / (std_N Q + ε)        statistics over the N tokens, per feature
    K̂ = (K − mean_N K) / (std_N K + ε)
    out = Q̂ · (K̂ᵀ V) / N                       d×d summary first: O(N·d²) time, O(N·d) memory

Without a softmax the product is associative, so (Q̂ K̂ᵀ) V = Q̂ (K̂ᵀ V) exactly; the N×N matrix is
never formed. ``EPS`` and the std estimator (population std, ``correction=0``) are fixed here and
nowhere else. Statistics and the reductions run in float32 even under autocast: a sum over 10⁵
tokens overflows in float16.

`seqnorm_attention` is the production path: a custom autograd Function that keeps only its inputs
and a few (B, H, 1, d) statistics for backward, never materializes Q̂ or K̂ (the normalization is
folded into the two d×d matrices), and handles constant features (std 0) without NaN gradients.
`seqnorm_attention_reference` is the same math in plain autograd, kept for tests and benchmarks.

Both attention modules share one interface, (B, N, C) → (B, N, C), and are registered by name in
``ATTENTION`` so that the model never branches on the kind.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5
"""Added to the per-feature std before dividing; keeps constant features (std 0) finite."""


# ----------------------------------------------------------------------------------------------
# functional forms, all on (B, H, N, d) tensors


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-feature mean, std and 1/(std + eps) over the token axis: three (B, H, 1, d) tensors."""
    var, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=0)
    std = var.sqrt()
    return mean, std, 1.0 / (std + eps)


class _SeqNormAttentionFn(torch.autograd.Function):
    """out = Q̂ (K̂ᵀ V) / N with the normalization folded into d×d matrices (float32 inputs).

    Forward, with r = 1/(std + ε):  S = K̂ᵀV/N = diag(r_k) (K − μ_k)ᵀ (V − μ_v) / N,  out = (Q − μ_q) diag(r_q) S
    Backward, with G = ∂L/∂out and dS = Q̂ᵀ G:
        dV = K̂ dS / N
        dQ = r_q ⊙ (G Sᵀ − mean_N(G) Sᵀ) − Q̂ ⊙ c / std_q,   c_j = Σ_k S_jk dS_jk / N
        dK = r_k ⊙ (V − μ_v) dSᵀ / N − K̂ ⊙ c / std_k
    (mean_N(dQ̂ ⊙ Q̂) and mean_N(dK̂ ⊙ K̂) both reduce to the same c, computed on d×d matrices.)
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
        n = q.shape[-2]
        mu_q, std_q, r_q = _stats(q, eps)  # (B, H, 1, d) each
        mu_k, std_k, r_k = _stats(k, eps)
        mu_v = v.mean(dim=-2, keepdim=True)  # (B, H, 1, d)
        # Centre K and V before the reduction over N. Exactly, K̂ᵀV = K̂ᵀ(V − μ_v) since K̂ sums to 0;
        # in float32, KᵀV − N μ_kᵀμ_v, or even K̂ᵀV, loses every digit once the means dwarf the spread
        # (inputs in the thousands): the rounding error of the means is multiplied by μ_v.
        s = r_k.mT * ((k - mu_k).mT @ (v - mu_v)) / n  # (B, H, d, d)  S = K̂ᵀ V / N
        s_q = r_q.mT * s  # (B, H, d, d)  diag(r_q) S
        out = (q - mu_q) @ s_q  # (B, H, N, d)  Q̂ S
        ctx.save_for_backward(q, k, v, mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, s)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        q, k, v, mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, s = ctx.saved_tensors
        n = q.shape[-2]
        g = g.to(q.dtype)
        q_c = q - mu_q  # (B, H, N, d)  recomputed, Q̂ = q_c · r_q
        ds = r_q.mT * (q_c.mT @ g)  # (B, H, d, d)  dS = Q̂ᵀ G
        c = (s * ds).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[0]:
            mean_dq_hat = g.mean(dim=-2, keepdim=True) @ s.mT  # (B, H, 1, d)
            grad_q = _normalization_backward(g @ (r_q.mT * s).mT, q_c, std_q, r_q, mean_dq_hat, c)
        del q_c
        k_c = k - mu_k  # (B, H, N, d)  K̂ = k_c · r_k
        if ctx.needs_input_grad[2]:
            grad_v = k_c @ (r_k.mT * ds / n)  # (B, H, N, d)  K̂ dS / N
        if ctx.needs_input_grad[1]:
            # r_k ⊙ ∂K̂ = r_k ⊙ (V − μ_v) dSᵀ / N, whose mean over N is exactly 0
            dk_hat = (v - mu_v) @ (r_k.mT * ds).mT / n  # (B, H, N, d)
            grad_k = _normalization_backward(dk_hat, k_c, std_k, r_k, torch.zeros_like(mu_k), c)
        return grad_q, grad_k, grad_v, None


def _normalization_backward(r_dxhat: Tensor, x_c: Tensor, std: Tensor, r: Tensor, mean_dxhat: Tensor, c: Tensor) -> Tensor:
    """Gradient through x̂ = x_c·r (x_c = x − μ) given r⊙∂L/∂x̂, (B, H, N, d), updated in place.

    ∂L/∂x = r ⊙ (∂x̂ − mean_N ∂x̂) − x̂ ⊙ c / std; for a constant feature (std 0) x̂ is 0 and so is
    the last term, which is why 1/std is taken as 0 there instead of inf.
    """
    inv_std = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))  # (B, H, 1, d)
    r_dxhat.addcmul_(x_c, r * c * inv_std, value=-1.0)
    r_dxhat -= r * mean_dxhat
    return r_dxhat


def seqnorm_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """Softmax-free sequence-normalized attention, linear in the number of tokens.

    Args:
        q, k, v: (B, H, N, d) queries, keys and values (any float dtype, any strides).
        eps: added to the per-feature std (see ``EPS``).
    Returns:
        (B, H, N, d) in the dtype of ``v``; computed in float32, autocast disabled inside.
    """
    if q.shape != k.shape or q.shape != v.shape or q.dim() < 3:
        raise ValueError(f"q, k, v must share one (..., N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = _SeqNormAttentionFn.apply(q.float(), k.float(), v.float(), eps)
    return out.to(out_dtype)


def seqnorm_attention_reference(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """The same math as `seqnorm_attention` in plain autograd (materializes Q̂ and K̂)."""
    n = q.shape[-2]
    q_hat = (q - q.mean(-2, keepdim=True)) / (q.var(-2, keepdim=True, correction=0).sqrt() + eps)
    k_hat = (k - k.mean(-2, keepdim=True)) / (k.var(-2, keepdim=True, correction=0).sqrt() + eps)
    return q_hat @ (k_hat.mT @ v) / n  # (B, H, N, d)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Standard attention softmax(QKᵀ/√d)V through PyTorch's fused SDPA kernels: (B, H, N, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def softmax_attention_explicit(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Standard attention with the N×N matrix materialized, for benchmarks: (B, H, N, d)."""
    weights = torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return weights @ v


# ----------------------------------------------------------------------------------------------
# modules: (B, N, C) → (B, N, C)

ATTENTION: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention module to ``ATTENTION`` under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION[name] = cls
        return cls

    return add


class MultiHeadSelfAttention(nn.Module):
    """Projections shared by every attention kind; subclasses define `attend` on (B, H, N, d)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d), views
        out = self.attend(q, k, v)  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


@register_attention("seqnorm")
class SeqNormAttention(MultiHeadSelfAttention):
    """Softmax-free attention with sequence normalization of Q and K: O(N·d²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return seqnorm_attention(q, k, v)


@register_attention("softmax")
class SoftmaxAttention(MultiHeadSelfAttention):
    """The reference: softmax(QKᵀ/√d)V through SDPA, O(N²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return softmax_attention(q, k, v)


def build_attention(kind: str, *, dim: int, num_heads: int, qkv_bias: bool = True) -> nn.Module:
    """Instantiate the attention registered as ``kind``."""
    if kind not in ATTENTION:
        raise ValueError(f"attention={kind!r} is not one of {sorted(ATTENTION)}")
    return ATTENTION[kind](dim=dim, num_heads=num_heads, qkv_bias=qkv_bias)

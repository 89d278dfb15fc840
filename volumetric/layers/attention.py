"""Self-attention: softmax-free sequence-normalized attention and the softmax reference.

The method (docs/method.md#sequence-normalization), per batch element and head, with N tokens of
width d; V enters unnormalized:

    Q̂ = (Q − mean_N Q) / (std_N Q + ε)        statistics over the N tokens, per feature
    K̂ = (K − mean_N K) / (std_N K + ε)
    out = Q̂ · (K̂ᵀ V) / N                       d×d summary first: O(N·d²) time, O(N·d) memory

Without a softmax the product is associative, so (Q̂ K̂ᵀ) V = Q̂ (K̂ᵀ V) exactly; the N×N matrix is
never formed. ``EPS`` and the std estimator (population std, ``correction=0``) are fixed here and
nowhere else. Statistics and the reductions run in float32 even under autocast: a sum over 10⁵
tokens overflows in float16.

`seqnorm_attention` is the production path: a custom autograd Function that keeps only its inputs
and a few (B, H, 1, d) statistics for backward, never materializes Q̂ or K̂ (the normalization is
folded into d×d matrices), and handles constant features (std 0) without NaN gradients.
`seqnorm_attention_reference` is the same math in plain autograd, kept for tests and benchmarks.

Both attention modules share one interface, (B, N, C) → (B, N, C), and are registered by name in
``ATTENTION`` so that the model never branches on the kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5
"""Added to the per-feature std before dividing; keeps constant features (std 0) finite."""


# ----------------------------------------------------------------------------------------------
# functional forms, all on (B, H, N, d) tensors


WELL_CONDITIONED = 32.0
"""Features whose |mean| is at most this many stds take the fast moments (see `_moments`)."""


def _moments(x: Tensor, exact: bool) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population variance over the token axis: two (B, H, 1, d) tensors.

    Fast form: the sum and the diagonal of the Gram matrix xᵀx, two reads at matmul speed and no
    (N, d) temporary; its rounding error grows with (mean/std)². Exact form: two passes through a
    centred copy. `torch.var_mean` gives the same numbers but is several times slower on the CPU.
    """
    n = x.shape[-2]
    mean = x.sum(dim=-2, keepdim=True) / n
    if exact:
        return mean, (x - mean).square().sum(dim=-2, keepdim=True) / n
    square = torch.diagonal(x.mT @ x, dim1=-2, dim2=-1).unsqueeze(-2) / n  # (B, H, 1, d)
    return mean, (square - mean.square()).clamp_min(0.0)


def _rows_times(x: Tensor, m: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """x @ m + bias with x (B, H, N, d), m (B, H, d, e), bias (B, H, 1, e), as one baddbmm per batch
    element: strided views go to BLAS as they are, and the bias costs no extra pass."""
    if out is None:
        out = x.new_empty(x.shape[:-1] + m.shape[-1:])
    for b in range(x.shape[0]):
        torch.baddbmm(bias[b], x[b], m[b], out=out[b])
    return out


class _SeqNormAttentionFn(torch.autograd.Function):
    """out = Q̂ (K̂ᵀ V) / N on float32 (B, H, N, d) inputs, with the normalization folded into d×d
    matrices so that Q̂ and K̂ are never formed.

    Forward, with μ, σ the per-feature mean and std over N and r = 1/(σ + ε):
        S   = K̂ᵀ V / N = diag(r_k) [Kᵀ(V − μ_v) − μ_kᵀ Σ(V − μ_v)] / N          (d×d)
        out = Q̂ S = Q (diag(r_q) S) − μ_q diag(r_q) S                           (one baddbmm)
    Backward, with G = ∂L/∂out, dS = Q̂ᵀ G = diag(r_q) (QᵀG − N μ_qᵀ μ_G) and c_j = Σ_k S_jk dS_jk / N:
        dV = K̂ dS / N = K D − μ_k D,                D = diag(r_k) dS / N
        dQ = r_q ⊙ (G Sᵀ − μ_G Sᵀ) − (Q − μ_q) ⊙ r_q c / σ_q
        dK = r_k ⊙ (V dSᵀ − μ_V dSᵀ) / N − (K − μ_k) ⊙ r_k c / σ_k
    (mean_N(∂Q̂ ⊙ Q̂) and mean_N(∂K̂ ⊙ K̂) both reduce to c, computed on d×d matrices.) Backward
    keeps only q, k, v and (B, H, 1, d) statistics; every (N, d) product is one baddbmm, and the
    normalization gradient one addcmul that the matmul then accumulates onto.

    Precision: the subtractions above lose (mean/std) digits, once. V is centred before the only
    reduction where two means would multiply; when some feature of Q or K has |mean| > 32 std
    (raw intensities, a constant feature), forward and backward work on centred copies of Q, K
    and V instead (exact, one extra (N, d) temporary each). V is not tested for this: inside the
    model it comes out of a LayerNorm'd projection, and its mean only enters dK.
    (Derivation and precision argument: docs/method.md#the-fused-kernel, docs/method.md#precision.)
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
        n = q.shape[-2]
        mu_q, var_q = _moments(q, exact=False)  # (B, H, 1, d) each
        mu_k, var_k = _moments(k, exact=False)
        limit = WELL_CONDITIONED**2
        exact = bool((mu_q.square() > limit * var_q).any() or (mu_k.square() > limit * var_k).any())
        if exact:
            mu_q, var_q = _moments(q, exact=True)
            mu_k, var_k = _moments(k, exact=True)
        std_q, std_k = var_q.sqrt(), var_k.sqrt()
        r_q, r_k = 1.0 / (std_q + eps), 1.0 / (std_k + eps)
        mu_v = v.sum(dim=-2, keepdim=True) / n  # (B, H, 1, d)
        v_c = v - mu_v  # (B, H, N, d), freed below
        if exact:
            kv = (k - mu_k).mT @ v_c  # (B, H, d, d)
        else:
            kv = k.mT @ v_c - mu_k.mT @ v_c.sum(dim=-2, keepdim=True)  # (B, H, d, d)
        del v_c
        s = r_k.mT * kv / n  # (B, H, d, d)  S = K̂ᵀ V / N
        s_q = r_q.mT * s  # (B, H, d, d)  diag(r_q) S
        # out in (B, N, H, d) memory, so that merging the heads afterwards is a free view
        out = q.new_empty(q.shape[0], n, q.shape[1], q.shape[-1]).transpose(1, 2)  # (B, H, N, d)
        if exact:  # (Q − μ_q) diag(r_q) S from a centred copy: no cancellation of μ_q·r_q terms
            _rows_times(q - mu_q, s_q, torch.zeros_like(mu_q), out=out)
        else:
            _rows_times(q, s_q, -(mu_q @ s_q), out=out)
        ctx.exact = exact
        ctx.save_for_backward(q, k, v, mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, s)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        # backward may run inside the caller's autocast region; it must stay float32 like forward
        with torch.autocast(device_type=g.device.type, enabled=False):
            return _SeqNormAttentionFn._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        q, k, v, mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, s = ctx.saved_tensors
        n = q.shape[-2]
        g = g.to(q.dtype)
        mu_g = g.sum(dim=-2, keepdim=True) / n  # (B, H, 1, d)
        if ctx.exact:  # ill-conditioned Q or K: work on centred copies (see the class docstring)
            q, k, v = q - mu_q, k - mu_k, v - mu_v  # (B, H, N, d) each
            mu_q, mu_k, mu_v = (
                torch.zeros_like(mu_q),
                torch.zeros_like(mu_k),
                torch.zeros_like(mu_v),
            )
        ds = r_q.mT * (q.mT @ g - n * (mu_q.mT @ mu_g))  # (B, H, d, d)  dS = Q̂ᵀ G
        c = (s * ds).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[2]:
            d = r_k.mT * ds / n  # (B, H, d, d)
            grad_v = _rows_times(k, d, -(mu_k @ d))  # (B, H, N, d)  K̂ dS / N
        if ctx.needs_input_grad[0]:
            m = (r_q.mT * s).mT  # (B, H, d, d): r_q ⊙ (G Sᵀ) = G m
            grad_q = _normalization_backward(g, m, mu_g, q, mu_q, std_q, r_q, c)
        if ctx.needs_input_grad[1]:
            m = (r_k.mT * ds).mT / n  # (B, H, d, d): r_k ⊙ ∂K̂ = V m
            grad_k = _normalization_backward(v, m, mu_v, k, mu_k, std_k, r_k, c)
        return grad_q, grad_k, grad_v, None


def _normalization_backward(
    y: Tensor, m: Tensor, mu_y: Tensor, x: Tensor, mu: Tensor, std: Tensor, r: Tensor, c: Tensor
) -> Tensor:
    """∂L/∂x for x̂ = (x − μ)·r, where r ⊙ ∂L/∂x̂ = y m (y, x: (B, H, N, d); m: (B, H, d, d)).

    ∂L/∂x = r ⊙ (∂x̂ − mean_N ∂x̂) − x̂ ⊙ c / std = y m − μ_y m − (x − μ) ⊙ a,  a = r c / std.
    A constant feature (std 0) has x̂ = 0, so its last term is 0: 1/std is taken as 0 there.
    """
    inv_std = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))  # (B, H, 1, d)
    a = r * c * inv_std  # (B, H, 1, d)
    grad = torch.addcmul(
        mu * a - mu_y @ m, x, a, value=-1.0
    )  # (B, H, N, d): the elementwise part first,
    for b in range(
        x.shape[0]
    ):  # then the matmul accumulates onto it (BLAS beta = 1): no extra pass
        grad[b].baddbmm_(y[b], m[b])
    return grad


def seqnorm_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """Softmax-free sequence-normalized attention, linear in the number of tokens.

    Args:
        q, k, v: (B, H, N, d) queries, keys and values (any float dtype, any strides).
        eps: added to the per-feature std (see ``EPS``).
    Returns:
        (B, H, N, d) in the dtype of ``v``; computed in float32, autocast disabled inside.
    """
    if q.shape != k.shape or q.shape != v.shape or q.dim() < 3:
        raise ValueError(
            f"q, k, v must share one (..., N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
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


def seqnorm_attention_plain(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """The same value as `seqnorm_attention` in plain, traceable ops, for model export.

    The production path branches on the data (fast or exact moments) and loops over the batch in
    Python, which a graph exporter cannot capture for every batch size and token count. Here the
    moments always come from centred copies (the exact form, so no branch is needed) and every
    product is a batched matmul. Meant for inference: under autograd it would keep Q̂ and K̂. Inputs
    below float32 are computed in float32 as in the production path; float64 stays float64.
    """
    out_dtype = v.dtype
    if q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    n = q.shape[-2]
    q_c = q - q.mean(-2, keepdim=True)  # (B, H, N, d)
    k_c = k - k.mean(-2, keepdim=True)
    q_hat = q_c / (q_c.square().mean(-2, keepdim=True).sqrt() + eps)  # population std
    k_hat = k_c / (k_c.square().mean(-2, keepdim=True).sqrt() + eps)
    return (q_hat @ (k_hat.mT @ v) / n).to(out_dtype)  # (B, H, d, d) summary, then (B, H, N, d)


def _exporting() -> bool:
    """True while torch.export (also under the ONNX exporter) or the TorchScript ONNX exporter
    traces the model."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


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
        if _exporting():  # the production Function cannot be traced (see seqnorm_attention_plain)
            return seqnorm_attention_plain(q, k, v)
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

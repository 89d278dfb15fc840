"""Attention as functions on (B, H, N, d) queries, keys and values: the plain forms.

    seqnorm_attention_reference   SN(Q) (SN(K)ᵀ SN(V)) / N in plain autograd, Q̂, K̂, V̂ formed:
                                  the readable statement of the method, kept for tests and
                                  benchmarks (docs/method.md#sequence-normalization)
    seqnorm_attention_plain       the same value in branch-free, traceable ops, for export
    sima_attention                SimA (Koohpayegani & Pirsiavash, WACV 2024)
    softmax_attention             softmax(QKᵀ/√d)V through SDPA, the reference
    softmax_attention_explicit    the same with the N×N matrix formed, for benchmarks

and what the production kernel (volumetric/layers/seqnorm_kernel.py) shares with them: ``EPS``
and the std estimator (population std, ``correction=0``), fixed here and nowhere else, the
checks of the inputs and the folding of the learnable affine into the d×d summary.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
"""Added to the per-feature std before dividing; keeps constant features (std 0) finite."""

SIMA_EPS = 1e-12
"""SimA's floor on the L1 norm (that of ``F.normalize``, which SimA's own code uses)."""


def fold_affine(
    s: Tensor, mu_v: Tensor, weight: Tensor, bias: Tensor, normalize_v: bool
) -> tuple[Tensor, Tensor]:
    """Fold the learnable per-feature affine of the normalized tokens into the d×d summary.

    The affine scales every normalized input, X̂ diag(γ_x), and shifts Q̂ (and K̂ in seqnorm_qk)
    by a row β_x. With S = K̂ᵀ Ṽ / N (Ṽ = V̂, or V raw in seqnorm_qk):

        seqnorm:     K'ᵀ V'/N = diag(γ_k) S diag(γ_v)           (1ᵀ K̂ = 0 and 1ᵀ V̂ = 0)
        seqnorm_qk:  K'ᵀ V /N = diag(γ_k) S + β_k μ_vᵀ           (V raw: its mean stays)
        out = Q' T = Q̂ P + 1 b,   P = diag(γ_q) T,   b = β_q T

    so every scale and shift lands on (B, H, d, d) and (B, H, 1, d) tensors; no (N, d) tensor is
    scaled or shifted. Shifts of K̂ and V̂ in seqnorm are left out: both are centred, so either
    shift alone changes nothing, and the two together add only the data-independent β_k β_vᵀ,
    whose gradient is zero at the zero start (they would never move from it).
    ``weight``: (n, H, d), rows γ of Q̂, K̂ (and V̂); ``bias``: (m, H, d), rows β of Q̂ (and K̂).
    Returns P (B, H, d, d) and b (B, H, 1, d).
    """
    # elementwise products only (no matmul broadcasting the parameters over B), which keeps the
    # batch dynamic when a model is exported
    gamma, beta = weight.unsqueeze(-1), bias.unsqueeze(-1)  # (n, H, d, 1): broadcast over B
    t = gamma[1] * s  # diag(γ_k) S
    if normalize_v:
        t = t * gamma[2].mT  # … diag(γ_v)
    else:
        t = t + beta[1] * mu_v  # … + β_k μ_vᵀ, an outer product
    return gamma[0] * t, (beta[0] * t).sum(dim=-2, keepdim=True)  # P = diag(γ_q) T, b = β_q T


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    normalize_v: bool = True,
) -> None:
    if q.shape != k.shape or q.shape != v.shape or q.dim() < 3:
        raise ValueError(
            f"q, k, v must share one (..., N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias of the affine go together: give both or neither")
    if weight is not None:
        bias = cast(Tensor, bias)  # not None: checked just above
        want = affine_shapes(normalize_v, q.shape[-3], q.shape[-1])
        if (tuple(weight.shape), tuple(bias.shape)) != want:
            raise ValueError(
                f"weight and bias of the affine must be {want[0]} and {want[1]}, got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            )


def affine_shapes(
    normalize_v: bool, heads: int, head_dim: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of the affine's weight (scales of Q̂, K̂ and V̂, or Q̂ and K̂) and bias (shifts of Q̂,
    or of Q̂ and K̂ when V is raw; see `fold_affine`)."""
    return (3 if normalize_v else 2, heads, head_dim), (1 if normalize_v else 2, heads, head_dim)


def _normalized(x: Tensor, eps: float) -> Tensor:
    """SN(x) over the token axis (population std, ε added to it), from a centred copy."""
    x_c = x - x.mean(-2, keepdim=True)
    return x_c / (x_c.square().mean(-2, keepdim=True).sqrt() + eps)


def seqnorm_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eps: float = EPS,
    *,
    normalize_v: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The same math as `seqnorm_attention` in plain autograd: materializes Q̂, K̂ (and V̂), and
    applies the affine to them, not to the summaries."""
    check_inputs(q, k, v, weight, bias, normalize_v)
    n = q.shape[-2]
    q_hat = (q - q.mean(-2, keepdim=True)) / (q.var(-2, keepdim=True, correction=0).sqrt() + eps)
    k_hat = (k - k.mean(-2, keepdim=True)) / (k.var(-2, keepdim=True, correction=0).sqrt() + eps)
    v_hat = v
    if normalize_v:
        v_hat = (v - v.mean(-2, keepdim=True)) / (
            v.var(-2, keepdim=True, correction=0).sqrt() + eps
        )
    if weight is not None:
        bias = cast(Tensor, bias)  # check_inputs: both or neither
        gamma, beta = weight.unsqueeze(-2), bias.unsqueeze(-2)  # (n, H, 1, d)
        q_hat, k_hat = q_hat * gamma[0] + beta[0], k_hat * gamma[1]
        if normalize_v:
            v_hat = v_hat * gamma[2]
        else:
            k_hat = k_hat + beta[1]
    return q_hat @ (k_hat.mT @ v_hat) / n  # (B, H, N, d)


def seqnorm_attention_plain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eps: float = EPS,
    *,
    normalize_v: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The same value as `seqnorm_attention` in plain, traceable ops, for model export.

    The production path branches on the data (fast or exact moments) and loops over the batch in
    Python, which a graph exporter cannot capture for every batch size and token count. Here the
    moments always come from centred copies (the exact form, so no branch is needed), every
    product is a batched matmul, and the affine is folded as in the production path. Meant for
    inference: under autograd it would keep Q̂ and K̂. Inputs below float32 are computed in
    float32 as in the production path; float64 stays float64.
    """
    out_dtype = v.dtype
    if q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
        if weight is not None:  # (the casts: bias comes with weight, as check_inputs requires)
            weight, bias = weight.float(), cast(Tensor, bias).float()
    n = q.shape[-2]
    q_hat, k_hat = _normalized(q, eps), _normalized(k, eps)  # (B, H, N, d)
    s = k_hat.mT @ (_normalized(v, eps) if normalize_v else v) / n  # (B, H, d, d)
    if weight is None:
        return (q_hat @ s).to(out_dtype)
    p, b = fold_affine(s, v.mean(-2, keepdim=True), weight, cast(Tensor, bias), normalize_v)
    return (q_hat @ p + b).to(out_dtype)  # (B, H, N, d)


def sima_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = SIMA_EPS) -> Tensor:
    """SimA: Q and K each divided by their L1 norm over the N tokens, per feature (no centring,
    no softmax), then out = Q̃ (K̃ᵀ V), linear in N: (B, H, N, d).

    The norms are floored at ``eps`` as ``F.normalize`` does. Computed in float32 under autocast,
    like `seqnorm_attention` (the L1 norms are sums over the tokens); float64 stays float64.
    Plain autograd: backward keeps Q̃ and K̃ beside the inputs.
    """
    check_inputs(q, k, v)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        if q.dtype != torch.float64:
            q, k, v = q.float(), k.float(), v.float()
        q = F.normalize(q, p=1.0, dim=-2, eps=eps)  # (B, H, N, d): each column sums to ±1 in |·|
        k = F.normalize(k, p=1.0, dim=-2, eps=eps)
        out = q @ (k.mT @ v)  # (B, H, d, d) summary, then (B, H, N, d)
    return out.to(out_dtype)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Standard attention softmax(QKᵀ/√d)V through PyTorch's fused SDPA kernels: (B, H, N, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def softmax_attention_explicit(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Standard attention with the N×N matrix materialized, for benchmarks: (B, H, N, d)."""
    weights = torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return weights @ v

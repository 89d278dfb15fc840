"""The production path of sequence-normalized attention: one custom autograd Function.

`seqnorm_attention` keeps only its inputs and a few (B, H, 1, d) statistics and d×d summaries for
backward, never materializes Q̂, K̂ or V̂ (the normalization, and the optional learnable affine,
are folded into d×d matrices), and handles constant features (std 0) without NaN gradients. The
algebra and its precision argument: docs/method.md#the-fused-kernel, docs/method.md#precision.
The plain forms it is tested against are in volumetric/layers/attention_functional.py.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from volumetric.layers.attention_functional import EPS, check_inputs, fold_affine

WELL_CONDITIONED = 32.0
"""Features whose |mean| is at most this many stds take the fast path (see `_moments`)."""


def _moments(x: Tensor, exact: bool, gram: bool = True) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population variance over the token axis: two (B, H, 1, d) tensors.

    Fast form: the sum and the mean square, var = mean(x²) − mean², whose rounding error grows
    with (mean/std)². The mean square comes from the diagonal of the Gram matrix xᵀx (two reads
    at matmul speed, no (N, d) temporary) or, with ``gram=False``, from one elementwise pass
    (x², summed: no matmul FLOPs, one short-lived temporary; measured no slower on a 2-core
    CPU). Exact form: two passes through a centred copy. `torch.var_mean` gives the same numbers
    but is several times slower on the CPU.
    """
    n = x.shape[-2]
    mean = x.sum(dim=-2, keepdim=True) / n
    if exact:
        return mean, (x - mean).square().sum(dim=-2, keepdim=True) / n
    if gram:
        square = torch.diagonal(x.mT @ x, dim1=-2, dim2=-1).unsqueeze(-2) / n  # (B, H, 1, d)
    else:
        square = x.square().sum(dim=-2, keepdim=True) / n
    return mean, (square - mean * mean).clamp_min(0.0)


def _rows_times(x: Tensor, m: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """x @ m + bias with x (B, H, N, d), m (B, H, d, e), bias (B, H, 1, e), as one baddbmm per batch
    element: strided views go to BLAS as they are, and the bias costs no extra pass."""
    if out is None:
        out = x.new_empty(x.shape[:-1] + m.shape[-1:])
    for b in range(x.shape[0]):
        torch.baddbmm(bias[b], x[b], m[b], out=out[b])
    return out


class _SeqNormAttentionFn(torch.autograd.Function):
    """out = Q̂ (K̂ᵀ Ṽ) / N on (B, H, N, d) inputs, Ṽ = V̂ (``normalize_v``) or V, with the
    normalization folded into d×d matrices so that Q̂, K̂ and V̂ are never formed.

    Forward, with μ, σ the per-feature mean and std over N, r = 1/(σ + ε), and r_v = 1 when V is
    not normalized:
        S   = K̂ᵀ V̂ / N = diag(r_k) [Kᵀ V − N μ_kᵀ μ_v] diag(r_v) / N                 (seqnorm)
        S   = K̂ᵀ V / N  = diag(r_k) [Kᵀ(V − μ_v) − μ_kᵀ Σ(V − μ_v)] / N         (seqnorm_qk)
        out = Q̂ P = Q (diag(r_q) P) − μ_q diag(r_q) P (+ b)                     (one baddbmm)
    where P = S, or P and b from `fold_affine` when the affine is on. Because K̂ is centred, the
    mean of V drops out of S (K̂ᵀ 1 = 0): normalizing V costs its std, one reduction over N, and
    the column scale diag(r_v) on S. Backward, with G = ∂L/∂out, dP = Q̂ᵀ G =
    diag(r_q) (QᵀG − N μ_qᵀ μ_G), dS = dP (or through the fold), and the d-vectors
    c_q = rowsum(P ⊙ dP)/N, c_k = rowsum(S ⊙ dS)/N, c_v = colsum(S ⊙ dS)/N:
        D  = diag(r_k) dS diag(r_v) / N                                            (d×d)
        dQ = r_q ⊙ (G Pᵀ − μ_G Pᵀ) − (Q − μ_q) ⊙ r_q c_q / σ_q
        dK = V Dᵀ − μ_v Dᵀ − (K − μ_k) ⊙ r_k c_k / σ_k
        dV = K D − μ_k D − (V − μ_v) ⊙ r_v c_v / σ_v      (seqnorm; seqnorm_qk: K D − μ_k D)
    (c_x = mean_N(∂X̂ ⊙ X̂), the gradient through X's own statistics; each reduces to d×d
    matrices.) Every (N, d) product is one baddbmm, and each normalization gradient one addcmul
    that the matmul then accumulates onto. The affine's d×d fold is differentiated by autograd in
    backward (recomputed on the saved S: d×d work).

    Precision: the subtractions above lose (mean/std) digits, once. When some feature of Q or K
    (or of V, when V is normalized) has |mean| > 32 std (raw intensities, a constant feature),
    forward and backward work on centred copies of Q, K and V instead (exact, one extra (N, d)
    temporary each). In seqnorm_qk V is not tested, so it is centred before the one reduction
    where two means would multiply.
    (Derivation and precision argument: docs/method.md#the-fused-kernel, docs/method.md#precision.)
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        normalize_v: bool,
    ) -> Tensor:
        n = q.shape[-2]
        normalized = (q, k, v) if normalize_v else (q, k)
        # V's mean square from an elementwise pass, Q's and K's from the Gram diagonal
        stats = [_moments(x, exact=False, gram=i < 2) for i, x in enumerate(normalized)]
        # (n, B, H, 1, d): the statistics of the 2 or 3 normalized inputs side by side, so that
        # each small elementwise step below is one call (a call can cost a thread-team start)
        mu, var = (torch.stack(column) for column in zip(*stats))
        exact = bool((mu * mu > WELL_CONDITIONED**2 * var).any())
        if exact:
            stats = [_moments(x, exact=True) for x in normalized]
            mu, var = (torch.stack(column) for column in zip(*stats))
        std = var.sqrt()
        r = 1.0 / (std + eps)
        mu_q, mu_k, std_q, std_k, r_q, r_k = mu[0], mu[1], std[0], std[1], r[0], r[1]
        if normalize_v:
            mu_v, std_v, r_v = mu[2], std[2], r[2]  # (B, H, 1, d) each
        else:
            mu_v, std_v, r_v = v.sum(dim=-2, keepdim=True) / n, None, None
        if exact:
            kv = (k - mu_k).mT @ (v - mu_v)  # (B, H, d, d)
        elif normalize_v:  # V within 32 std of its mean like K: μ_k μ_v cancels boundedly
            kv = k.mT @ v - n * (mu_k.mT @ mu_v)  # (B, H, d, d)
        else:  # V is not tested in seqnorm_qk: centred before the product
            v_c = v - mu_v  # (B, H, N, d), freed below
            kv = k.mT @ v_c - mu_k.mT @ v_c.sum(dim=-2, keepdim=True)  # (B, H, d, d)
            del v_c
        s = r_k.mT * kv / n  # (B, H, d, d)  S = K̂ᵀ V / N
        if normalize_v:  # K̂ᵀ V̂ / N: the std of V is a column scale of S, its mean drops out
            s = s * cast(Tensor, r_v)  # r_v: set when normalize_v
        # bias comes with weight (seqnorm_attention's check_inputs)
        p, b = (
            (s, None)
            if weight is None
            else fold_affine(s, mu_v, weight, cast(Tensor, bias), normalize_v)
        )
        p_q = r_q.mT * p  # (B, H, d, d)  diag(r_q) P
        # out in (B, N, H, d) memory, so that merging the heads afterwards is a free view
        out = q.new_empty(q.shape[0], n, q.shape[1], q.shape[-1]).transpose(1, 2)  # (B, H, N, d)
        if exact:  # (Q − μ_q) diag(r_q) P from a centred copy: no cancellation of μ_q·r_q terms
            _rows_times(q - mu_q, p_q, torch.zeros_like(mu_q) if b is None else b, out=out)
        else:
            _rows_times(q, p_q, -(mu_q @ p_q) if b is None else b - mu_q @ p_q, out=out)
        ctx.exact, ctx.normalize_v = exact, normalize_v
        ctx.save_for_backward(
            *(q, k, v, weight, bias),  # the inputs, then (B, H, 1, d) and (B, H, d, d) tensors
            *(mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, std_v, r_v, s, p),
        )
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        # backward may run inside the caller's autocast region; it must stay float32 like forward
        with torch.autocast(device_type=g.device.type, enabled=False):
            return _SeqNormAttentionFn._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        q, k, v, weight, bias, mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, std_v, r_v, s, p = (
            ctx.saved_tensors
        )
        n = q.shape[-2]
        g = g.to(q.dtype)
        mu_g = g.sum(dim=-2, keepdim=True) / n  # (B, H, 1, d)
        mu_v_saved = mu_v
        if ctx.exact:  # ill-conditioned inputs: work on centred copies (see the class docstring)
            q, k, v = q - mu_q, k - mu_k, v - mu_v  # (B, H, N, d) each
            mu_q, mu_k, mu_v = (
                torch.zeros_like(mu_q),
                torch.zeros_like(mu_k),
                torch.zeros_like(mu_v),
            )
        dp = r_q.mT * (q.mT @ g - n * (mu_q.mT @ mu_g))  # (B, H, d, d)  dP = Q̂ᵀ G
        ds, dmu_v, grad_w, grad_b = dp, None, None, None
        if weight is not None:  # through the d×d fold, by autograd on d×d tensors
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (s, mu_v_saved, weight, bias)]
                folded = fold_affine(leaves[0], leaves[1], leaves[2], leaves[3], ctx.normalize_v)
                ds, dmu_v, grad_w, grad_b = torch.autograd.grad(
                    folded, leaves, (dp, n * mu_g), allow_unused=True
                )
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[0]:
            c_q = (p * dp).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
            m = (r_q.mT * p).mT  # (B, H, d, d): r_q ⊙ (G Pᵀ) = G m
            grad_q = _normalization_backward(g, m, mu_g, q, mu_q, std_q, r_q, c_q)
        d = r_k.mT * ds / n  # (B, H, d, d)  D = diag(r_k) dS diag(r_v) / N
        if ctx.normalize_v:
            d = d * r_v
        if ctx.needs_input_grad[1]:
            c_k = (s * ds).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
            grad_k = _normalization_backward(v, d.mT, mu_v, k, mu_k, std_k, r_k, c_k)
        if ctx.needs_input_grad[2]:
            if ctx.normalize_v:
                c_v = (s * ds).sum(dim=-2, keepdim=True) / n  # (B, H, 1, d)
                grad_v = _normalization_backward(k, d, mu_k, v, mu_v, std_v, r_v, c_v)
            else:
                row = -(mu_k @ d) if dmu_v is None else dmu_v / n - mu_k @ d
                grad_v = _rows_times(k, d, row)  # (B, H, N, d)  K̂ dS / N (+ ∂L/∂μ_v / N)
        if not ctx.needs_input_grad[3]:
            grad_w = None
        if not ctx.needs_input_grad[4]:
            grad_b = None
        return grad_q, grad_k, grad_v, grad_w, grad_b, None, None


def _normalization_backward(
    y: Tensor, m: Tensor, mu_y: Tensor, x: Tensor, mu: Tensor, std: Tensor, r: Tensor, c: Tensor
) -> Tensor:
    """∂L/∂x for x̂ = (x − μ)·r, where r ⊙ ∂L/∂x̂ = y m (y, x: (B, H, N, d); m: (B, H, d, d)).

    ∂L/∂x = r ⊙ (∂x̂ − mean_N ∂x̂) − x̂ ⊙ c / std = y m − μ_y m − (x − μ) ⊙ a,  a = r c / std.
    A constant feature (std 0) has x̂ = 0, so its last term is 0: 1/std is taken as 0 there.
    """
    inv_std = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))  # (B, H, 1, d)
    a = r * c * inv_std  # (B, H, 1, d)
    # the elementwise part first, then the matmul accumulates onto it (BLAS beta = 1): one pass
    grad = torch.addcmul(mu * a - mu_y @ m, x, a, value=-1.0)  # (B, H, N, d)
    for b in range(x.shape[0]):
        grad[b].baddbmm_(y[b], m[b])
    return grad


def seqnorm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eps: float = EPS,
    *,
    normalize_v: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Softmax-free sequence-normalized attention, linear in the number of tokens.

    Args:
        q, k, v: (B, H, N, d) queries, keys and values (any float dtype, any strides).
        eps: added to the per-feature std (see ``EPS``).
        normalize_v: normalize V as well (the method, ``seqnorm``); False lets V enter raw
            (``seqnorm_qk``).
        weight, bias: optional learnable affine of the normalized tokens: per-feature scales
            (3, H, d) of Q̂, K̂, V̂ and shifts (1, H, d) of Q̂; with ``normalize_v`` False,
            scales and shifts (2, H, d) of Q̂ and K̂ (see `fold_affine` and `affine_shapes`).
    Returns:
        (B, H, N, d) in the dtype of ``v``; computed in float32, autocast disabled inside.
    """
    check_inputs(q, k, v, weight, bias, normalize_v)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        if weight is not None:  # and so is bias (check_inputs)
            weight, bias = weight.float(), cast(Tensor, bias).float()
        out = _SeqNormAttentionFn.apply(
            q.float(), k.float(), v.float(), weight, bias, eps, normalize_v
        )
    return out.to(out_dtype)

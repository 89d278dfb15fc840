"""Self-attention: softmax-free sequence-normalized attention, SimA, and the softmax reference.

The method (docs/method.md#sequence-normalization), per batch element and head, with N tokens of
width d:

    SN(X) = (X − mean_N X) / (std_N X + ε)     statistics over the N tokens, per feature
    Q̂, K̂, V̂ = SN(Q), SN(K), SN(V)
    out = Q̂ · (K̂ᵀ V̂) / N                        d×d summary first: O(N·d²) time, O(N·d) memory

registered as ``seqnorm`` (the default). ``seqnorm_qk`` is the earlier form that normalizes Q and
K only and lets V enter as the projection produced it; ``sima`` is SimA (Koohpayegani &
Pirsiavash, WACV 2024), Q and K divided by their L1 norm over the tokens, out = Q̃ (K̃ᵀ V).
Without a softmax the products are associative, so the N×N matrix is never formed. ``EPS`` and
the std estimator (population std, ``correction=0``) are fixed here and nowhere else. Statistics
and the reductions run in float32 even under autocast: a sum over 10⁵ tokens overflows in
float16.

`seqnorm_attention` is the production path for both sequence-normalized forms: one custom
autograd Function that keeps only its inputs and a few (B, H, 1, d) statistics and d×d summaries
for backward, never materializes Q̂, K̂ or V̂ (the normalization, and the optional learnable
affine, are folded into d×d matrices), and handles constant features (std 0) without NaN
gradients. `seqnorm_attention_reference` is the same math in plain autograd, kept for tests and
benchmarks; `seqnorm_attention_plain` is a branch-free form for model export.

Every attention module shares one interface, (B, N, C) → (B, N, C), and is registered by name in
``ATTENTION`` so that the model never branches on the kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5
"""Added to the per-feature std before dividing; keeps constant features (std 0) finite."""

V_SCALE_INIT = 0.1
"""Starting value of the affine's scales of V̂ (those of Q̂ and K̂ start at 1). Normalizing V lifts
the value features from their spread over the tokens at initialization, about 0.1, to 1, and the
attention branch then adds ten times more to the residual stream than with V raw; from scratch,
such a model did not learn a task whose label is a finding's location. Starting γ_V at 0.1 gives
the branch its Q,K-only size, and it learnt it (docs/method.md#sequence-normalization, "Optional
learnable affine")."""

SIMA_EPS = 1e-12
"""SimA's floor on the L1 norm (that of ``F.normalize``, which SimA's own code uses)."""


# ----------------------------------------------------------------------------------------------
# functional forms, all on (B, H, N, d) tensors


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


def _fold_affine(
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


class _SeqNormAttentionFn(torch.autograd.Function):
    """out = Q̂ (K̂ᵀ Ṽ) / N on (B, H, N, d) inputs, Ṽ = V̂ (``normalize_v``) or V, with the
    normalization folded into d×d matrices so that Q̂, K̂ and V̂ are never formed.

    Forward, with μ, σ the per-feature mean and std over N, r = 1/(σ + ε), and r_v = 1 when V is
    not normalized:
        S   = K̂ᵀ V̂ / N = diag(r_k) [Kᵀ V − N μ_kᵀ μ_v] diag(r_v) / N                 (seqnorm)
        S   = K̂ᵀ V / N  = diag(r_k) [Kᵀ(V − μ_v) − μ_kᵀ Σ(V − μ_v)] / N         (seqnorm_qk)
        out = Q̂ P = Q (diag(r_q) P) − μ_q diag(r_q) P (+ b)                     (one baddbmm)
    where P = S, or P and b from `_fold_affine` when the affine is on. Because K̂ is centred, the
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
        if normalize_v:
            s = s * r_v  # K̂ᵀ V̂ / N: the std of V is a column scale of S, its mean drops out
        p, b = (s, None) if weight is None else _fold_affine(s, mu_v, weight, bias, normalize_v)
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
                folded = _fold_affine(*leaves, ctx.normalize_v)
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


def _check_inputs(
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
    or of Q̂ and K̂ when V is raw; see `_fold_affine`)."""
    return (3 if normalize_v else 2, heads, head_dim), (1 if normalize_v else 2, heads, head_dim)


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
            scales and shifts (2, H, d) of Q̂ and K̂ (see `_fold_affine` and `affine_shapes`).
    Returns:
        (B, H, N, d) in the dtype of ``v``; computed in float32, autocast disabled inside.
    """
    _check_inputs(q, k, v, weight, bias, normalize_v)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        if weight is not None:
            weight, bias = weight.float(), bias.float()
        out = _SeqNormAttentionFn.apply(
            q.float(), k.float(), v.float(), weight, bias, eps, normalize_v
        )
    return out.to(out_dtype)


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
    _check_inputs(q, k, v, weight, bias, normalize_v)
    n = q.shape[-2]
    q_hat = (q - q.mean(-2, keepdim=True)) / (q.var(-2, keepdim=True, correction=0).sqrt() + eps)
    k_hat = (k - k.mean(-2, keepdim=True)) / (k.var(-2, keepdim=True, correction=0).sqrt() + eps)
    v_hat = v
    if normalize_v:
        v_hat = (v - v.mean(-2, keepdim=True)) / (
            v.var(-2, keepdim=True, correction=0).sqrt() + eps
        )
    if weight is not None:
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
        if weight is not None:
            weight, bias = weight.float(), bias.float()
    n = q.shape[-2]
    q_hat, k_hat = _normalized(q, eps), _normalized(k, eps)  # (B, H, N, d)
    s = k_hat.mT @ (_normalized(v, eps) if normalize_v else v) / n  # (B, H, d, d)
    if weight is None:
        return (q_hat @ s).to(out_dtype)
    p, b = _fold_affine(s, v.mean(-2, keepdim=True), weight, bias, normalize_v)
    return (q_hat @ p + b).to(out_dtype)  # (B, H, N, d)


def sima_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = SIMA_EPS) -> Tensor:
    """SimA: Q and K each divided by their L1 norm over the N tokens, per feature (no centring,
    no softmax), then out = Q̃ (K̃ᵀ V), linear in N: (B, H, N, d).

    The norms are floored at ``eps`` as ``F.normalize`` does. Computed in float32 under autocast,
    like `seqnorm_attention` (the L1 norms are sums over the tokens); float64 stays float64.
    Plain autograd: backward keeps Q̃ and K̃ beside the inputs.
    """
    _check_inputs(q, k, v)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        if q.dtype != torch.float64:
            q, k, v = q.float(), k.float(), v.float()
        q = F.normalize(q, p=1.0, dim=-2, eps=eps)  # (B, H, N, d): each column sums to ±1 in |·|
        k = F.normalize(k, p=1.0, dim=-2, eps=eps)
        out = q @ (k.mT @ v)  # (B, H, d, d) summary, then (B, H, N, d)
    return out.to(out_dtype)


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

    supports_affine = False
    """Whether the kind takes ``affine=True`` (a learnable affine after its normalization)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, out_norm: bool = False):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # TransNormer's fix for linear attention: a LayerNorm of the merged heads, per token,
        # before the projection, which bounds the output whatever the size of the summary
        self.out_norm = nn.LayerNorm(dim) if out_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d), views
        out = self.attend(q, k, v)  # (B, H, N, d)
        return self.proj(self.out_norm(out.transpose(1, 2).reshape(b, n, c)))  # (B, N, C)


@register_attention("seqnorm")
class SeqNormAttention(MultiHeadSelfAttention):
    """Softmax-free attention with sequence normalization of Q, K and V: O(N·d²).

    ``affine=True`` adds a learnable per-feature scale γ of Q̂ and K̂ (ones) and of V̂
    (`V_SCALE_INIT`) and shift β (zeros) of Q̂ (of Q̂ and K̂ in seqnorm_qk) after the
    normalization, folded into the d×d summaries (`_fold_affine`). They are stored flat, one block of C per normalized input in the
    qkv layout (head-major), so that the optimizer treats them like the LayerNorms' weights (no
    weight decay).
    """

    supports_affine = True
    normalize_v = True

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        out_norm: bool = False,
        affine: bool = False,
    ):
        super().__init__(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, out_norm=out_norm)
        if affine:
            (scales, _, _), (shifts, _, _) = affine_shapes(self.normalize_v, 1, dim)
            weight = torch.ones(scales * dim)  # (n·C,): γ_Q, γ_K[, γ_V]
            if self.normalize_v:
                weight[2 * dim :] = V_SCALE_INIT
            self.norm_weight = nn.Parameter(weight)
            self.norm_bias = nn.Parameter(torch.zeros(shifts * dim))  # (m·C,)
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        weight = bias = None
        if self.norm_weight is not None:
            shape = (-1, self.num_heads, q.shape[-1])  # (n, H, d) and (m, H, d)
            weight, bias = self.norm_weight.view(shape), self.norm_bias.view(shape)
        options = dict(normalize_v=self.normalize_v, weight=weight, bias=bias)
        if _exporting():  # the production Function cannot be traced (see seqnorm_attention_plain)
            return seqnorm_attention_plain(q, k, v, **options)
        return seqnorm_attention(q, k, v, **options)


@register_attention("seqnorm_qk")
class SeqNormQKAttention(SeqNormAttention):
    """The earlier form: Q and K sequence-normalized, V as the projection produced it: O(N·d²)."""

    normalize_v = False


@register_attention("sima")
class SimAAttention(MultiHeadSelfAttention):
    """SimA (Koohpayegani & Pirsiavash): Q, K L1-normalized over the tokens, no softmax, O(N·d²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sima_attention(q, k, v)


@register_attention("softmax")
class SoftmaxAttention(MultiHeadSelfAttention):
    """The reference: softmax(QKᵀ/√d)V through SDPA, O(N²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return softmax_attention(q, k, v)


def supports_affine(kind: str) -> bool:
    """Whether the attention registered as ``kind`` takes a learnable affine (``affine=True``)."""
    return getattr(ATTENTION[kind], "supports_affine", False)


def build_attention(
    kind: str,
    *,
    dim: int,
    num_heads: int,
    qkv_bias: bool = True,
    affine: bool = False,
    out_norm: bool = False,
) -> nn.Module:
    """Instantiate the attention registered as ``kind``; ``affine`` only for kinds that take one,
    ``out_norm`` (a LayerNorm before the output projection) for every kind."""
    if kind not in ATTENTION:
        raise ValueError(f"attention={kind!r} is not one of {sorted(ATTENTION)}")
    options = dict(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, out_norm=out_norm)
    if not affine:
        return ATTENTION[kind](**options)
    if not supports_affine(kind):
        kinds = sorted(name for name in ATTENTION if supports_affine(name))
        raise ValueError(f"affine=True applies to attention {kinds}, not attention={kind!r}")
    return ATTENTION[kind](**options, affine=True)

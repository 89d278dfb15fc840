"""The production path of sequence-normalized attention: one custom autograd Function.

`seqnorm_attention` keeps only its inputs and a few (B, H, 1, d) statistics and d×d summaries for
backward, never materializes Q̂, K̂ or V̂ (the normalization, and the optional learnable affine,
are folded into d×d matrices), and handles constant features (std 0) without NaN gradients. The
algebra and its precision argument: docs/method.md#the-fused-kernel, docs/method.md#precision.
The plain forms it is tested against are in volumetric/layers/attention_functional.py.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor

from volumetric.layers.attention_functional import EPS, check_inputs, fold_affine


def _moments(x: Tensor, gram: bool = True) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population variance over the token axis: two (B, H, 1, d) tensors.

    The sum and the mean square, var = mean(x²) − mean², whose rounding error grows with
    (mean/std)²: the inputs come centred (see `_SeqNormAttentionFn`). The mean square comes from
    the diagonal of the Gram matrix xᵀx (two reads at matmul speed, no (N, d) temporary) or, with
    ``gram=False``, from one elementwise pass (x², summed: no matmul FLOPs, one short-lived
    temporary; measured no slower on a 2-core CPU). `torch.var_mean` gives the same numbers but
    is several times slower on the CPU.
    """
    n = x.shape[-2]
    mean = x.sum(dim=-2, keepdim=True) / n
    if gram:
        square = torch.diagonal(x.mT @ x, dim1=-2, dim2=-1).unsqueeze(-2) / n  # (B, H, 1, d)
    else:
        square = x.square().sum(dim=-2, keepdim=True) / n
    return mean, (square - mean * mean).clamp_min(0.0)


def _rows_times(x: Tensor, m: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """x @ m + bias with x (B, H, N, d), m (B, H, d, e), bias (B, H, 1, e), as one baddbmm per batch
    element: strided views go to BLAS as they are, and the bias costs no extra pass. Under
    torch.compile, which cannot write into a strided ``out``, one batched product: the compiler
    fuses the bias and the copy into ``out`` itself."""
    if torch.compiler.is_compiling():
        result = torch.matmul(x, m) + bias
        return result if out is None else out.copy_(result)
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
    that the matmul then accumulates onto. The affine's d×d fold is differentiated in closed form
    (`_fold_affine_backward`, on the saved S: d×d work).

    Two backends share this d×d algebra (`_summary`, `_gradient_factors`) and differ in the
    passes over the N tokens: ``torch`` (BLAS and elementwise ops, any device) and ``triton``
    (volumetric/layers/seqnorm_triton.py: one pass over K and V for their moments and Kᵀ V
    together, one over Q and G in backward, fused products; CUDA).

    Precision: the subtractions above lose about (mean/std)² of float32's digits, so the inputs
    must come centred over the tokens, or nearly so: `seqnorm_attention` centres them (one
    (N, d) copy each), and the attention module centres its tokens before the projection, which
    centres Q, K and V at once (docs/method.md#precision). Nothing here depends on the values:
    no branch, no host synchronization, one graph for torch.compile and CUDA graphs. In
    seqnorm_qk V enters raw (its mean matters to the affine's fold), so it is centred before the
    one reduction where two means would multiply.
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
        backend: str,
    ) -> Tensor:
        ops = _BACKENDS[backend]()
        n = q.shape[-2]
        mu, var, mu_v, kv = ops.forward_stats(q, k, v, normalize_v)
        saved, p_q, row = _summary(mu, var, mu_v, kv, weight, bias, eps, normalize_v, n)
        # out in (B, N, H, d) memory, so that merging the heads afterwards is a free view
        out = q.new_empty(q.shape[0], n, q.shape[1], q.shape[-1]).transpose(1, 2)  # (B, H, N, d)
        ops.rows(q, p_q, row, out=out)
        ctx.normalize_v, ctx.backend = normalize_v, backend
        ctx.save_for_backward(q, k, v, weight, bias, *saved)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        # backward may run inside the caller's autocast region; it must stay float32 like forward
        with torch.autocast(device_type=g.device.type, enabled=False):
            return _SeqNormAttentionFn._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        q, k, v, weight, bias, *saved = ctx.saved_tensors
        ops = _BACKENDS[ctx.backend]()
        n = q.shape[-2]
        g = g.to(q.dtype)
        qtg, mu_g = ops.cross(q, g)  # (B, H, d, d) Qᵀ G, (B, H, 1, d)
        factors, grad_w, grad_b = _gradient_factors(
            _Saved(*saved), weight, bias, ctx.normalize_v, n, qtg, mu_g
        )
        inputs = {"q": (g, q), "k": (v, k), "v": (k, v)}  # y and x of each gradient
        grads = [
            ops.rows(inputs[name][0], m, row, x=inputs[name][1] if a is not None else None, a=a)
            if ctx.needs_input_grad[i]
            else None
            for i, (name, (m, row, a)) in enumerate(factors.items())
        ]
        if not ctx.needs_input_grad[3]:
            grad_w = None
        if not ctx.needs_input_grad[4]:
            grad_b = None
        return *grads, grad_w, grad_b, None, None, None


class _Saved(NamedTuple):
    """The (B, H, 1, d) statistics and (B, H, d, d) summaries forward keeps for backward."""

    mu_q: Tensor
    std_q: Tensor
    r_q: Tensor
    mu_k: Tensor
    std_k: Tensor
    r_k: Tensor
    mu_v: Tensor
    std_v: Tensor | None  # None (and r_v) when V is not normalized
    r_v: Tensor | None
    s: Tensor  # S = K̂ᵀ Ṽ / N
    p: Tensor  # P = S, or the fold's P


def _summary(
    mu: Tensor,
    var: Tensor,
    mu_v: Tensor,
    kv: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    normalize_v: bool,
    n: int,
) -> tuple[_Saved, Tensor, Tensor]:
    """From the statistics (``mu``, ``var``: (2 or 3, B, H, 1, d) of Q, K and a normalized V;
    ``mu_v`` V's mean) and the centred cross product ``kv`` = (K − μ_k)ᵀ (V − μ_v): what backward
    keeps, and P_q = diag(r_q) P and the row that out = Q P_q + row adds."""
    std = var.sqrt()
    r = 1.0 / (std + eps)
    mu_q, mu_k, std_q, std_k, r_q, r_k = mu[0], mu[1], std[0], std[1], r[0], r[1]
    std_v, r_v = (std[2], r[2]) if normalize_v else (None, None)
    s = r_k.mT * kv / n  # (B, H, d, d)  S = K̂ᵀ V / N
    if r_v is not None:  # K̂ᵀ V̂ / N: the std of V is a column scale of S, its mean drops out
        s = s * r_v
    # bias comes with weight (seqnorm_attention's check_inputs)
    p, b = (
        (s, None)
        if weight is None
        else fold_affine(s, mu_v, weight, cast(Tensor, bias), normalize_v)
    )
    p_q = r_q.mT * p  # (B, H, d, d)  diag(r_q) P
    row = -(mu_q @ p_q) if b is None else b - mu_q @ p_q  # (B, H, 1, d)
    saved = _Saved(mu_q, std_q, r_q, mu_k, std_k, r_k, mu_v, std_v, r_v, s, p)
    return saved, p_q, row


def _gradient_factors(
    sv: _Saved,
    weight: Tensor | None,
    bias: Tensor | None,
    normalize_v: bool,
    n: int,
    qtg: Tensor,
    mu_g: Tensor,
) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor | None]], Tensor | None, Tensor | None]:
    """The d×d part of backward: for each input x of Q, K, V the (m, row, a) of its gradient
    y m + row − x ⊙ a (y: G for Q, V for K, K for V; a None where no x term), and the affine's
    gradients."""
    dp = sv.r_q.mT * (qtg - n * (sv.mu_q.mT @ mu_g))  # (B, H, d, d)  dP = Q̂ᵀ G
    ds, dmu_v, grad_w, grad_b = dp, None, None, None
    if weight is not None:  # back through the d×d fold
        ds, dmu_v, grad_w, grad_b = _fold_affine_backward(
            sv.s, sv.mu_v, weight, cast(Tensor, bias), normalize_v, dp, n * mu_g
        )
    c_q = (sv.p * dp).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
    m_q = (sv.r_q.mT * sv.p).mT  # (B, H, d, d): r_q ⊙ (G Pᵀ) = G m_q
    d = sv.r_k.mT * ds / n  # (B, H, d, d)  D = diag(r_k) dS diag(r_v) / N
    if sv.r_v is not None:
        d = d * sv.r_v
    c_k = (sv.s * ds).sum(dim=-1, keepdim=True).mT / n  # (B, H, 1, d)
    factors: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {
        "q": _normalization_factor(m_q, mu_g, sv.mu_q, sv.std_q, sv.r_q, c_q),
        "k": _normalization_factor(d.mT, sv.mu_v, sv.mu_k, sv.std_k, sv.r_k, c_k),
    }
    if normalize_v:
        c_v = (sv.s * ds).sum(dim=-2, keepdim=True) / n  # (B, H, 1, d)
        std_v, r_v = cast(Tensor, sv.std_v), cast(Tensor, sv.r_v)
        factors["v"] = _normalization_factor(d, sv.mu_k, sv.mu_v, std_v, r_v, c_v)
    else:  # K̂ dS / N (+ ∂L/∂μ_v / N): V's only part in the output
        row = -(sv.mu_k @ d) if dmu_v is None else dmu_v / n - sv.mu_k @ d
        factors["v"] = (d, row, None)
    return factors, grad_w, grad_b


def _normalization_factor(
    m: Tensor, mu_y: Tensor, mu: Tensor, std: Tensor, r: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(m, row, a) of ∂L/∂x = y m + row − x ⊙ a for x̂ = (x − μ)·r, where r ⊙ ∂L/∂x̂ = y m:

    ∂L/∂x = r ⊙ (∂x̂ − mean_N ∂x̂) − x̂ ⊙ c / std = y m − μ_y m − (x − μ) ⊙ a,  a = r c / std.
    A constant feature (std 0) has x̂ = 0, so its last term is 0: 1/std is taken as 0 there.
    """
    inv_std = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))  # (B, H, 1, d)
    a = r * c * inv_std  # (B, H, 1, d)
    return m, mu * a - mu_y @ m, a


def _fold_affine_backward(
    s: Tensor,
    mu_v: Tensor,
    weight: Tensor,
    bias: Tensor,
    normalize_v: bool,
    dp: Tensor,
    db: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The gradients of `fold_affine` (P = diag(γ_q) T, b = β_q T, T from S as it says) with
    respect to S (B, H, d, d), μ_v (B, H, 1, d; None in seqnorm), the weight (n, H, d) and the
    bias (m, H, d), given ∂L/∂P = ``dp`` and ∂L/∂b = ``db`` (B, H, 1, d). Written out rather than
    left to autograd so that backward is one traceable graph (torch.compile)."""
    gamma, beta = weight.unsqueeze(-1), bias.unsqueeze(-1)  # (n, H, d, 1)
    t = gamma[1] * s  # diag(γ_k) S
    if normalize_v:
        t = t * gamma[2].mT
    else:
        t = t + beta[1] * mu_v
    dt = gamma[0] * dp + beta[0] * db  # (B, H, d, d): from P's rows and b's outer product
    grad_q_scale = (dp * t).sum(dim=(0, -1))  # (H, d)  Σ_b Σ_j dP_ij T_ij
    grad_q_shift = (db * t).sum(dim=(0, -1))  # (H, d)  Σ_b Σ_j db_j T_ij
    if normalize_v:
        ds = dt * gamma[1] * gamma[2].mT  # γ_k[i] γ_v[j] dT_ij
        grad_k_scale = (dt * s * gamma[2].mT).sum(dim=(0, -1))  # (H, d)
        grad_v_scale = (dt * s * gamma[1]).sum(dim=(0, -2))  # (H, d): over rows i
        grad_w = torch.stack([grad_q_scale, grad_k_scale, grad_v_scale])
        return ds, None, grad_w, grad_q_shift.unsqueeze(0)
    ds = dt * gamma[1]
    grad_k_scale = (dt * s).sum(dim=(0, -1))
    grad_k_shift = (dt * mu_v).sum(dim=(0, -1))  # Σ_j dT_ij μ_v[j]
    dmu_v = (dt * beta[1]).sum(dim=-2, keepdim=True)  # (B, H, 1, d): Σ_i dT_ij β_k[i]
    grad_w = torch.stack([grad_q_scale, grad_k_scale])
    return ds, dmu_v, grad_w, torch.stack([grad_q_shift, grad_k_shift])


class _TorchOps:
    """The passes over the N tokens in PyTorch ops (BLAS on the CPU, cuBLAS on CUDA)."""

    @staticmethod
    def forward_stats(q: Tensor, k: Tensor, v: Tensor, normalize_v: bool):
        """(mu, var) of Q, K (and V when normalized), V's mean, and (K − μ_k)ᵀ (V − μ_v)."""
        n = q.shape[-2]
        normalized = (q, k, v) if normalize_v else (q, k)
        # V's mean square from an elementwise pass, Q's and K's from the Gram diagonal
        stats = [_moments(x, gram=i < 2) for i, x in enumerate(normalized)]
        # (n, B, H, 1, d): the statistics side by side, so that each small elementwise step
        # after is one call (a call can cost a thread-team start)
        mu, var = (torch.stack(column) for column in zip(*stats))
        mu_k = mu[1]
        if normalize_v:  # V centred like K: μ_k μ_v is small, its cancellation harmless
            mu_v = mu[2]
            kv = k.mT @ v - n * (mu_k.mT @ mu_v)  # (B, H, d, d)
        else:  # V raw in seqnorm_qk: centred before the product
            mu_v = v.sum(dim=-2, keepdim=True) / n
            v_c = v - mu_v  # (B, H, N, d), freed below
            kv = k.mT @ v_c - mu_k.mT @ v_c.sum(dim=-2, keepdim=True)  # (B, H, d, d)
        return mu, var, mu_v, kv

    @staticmethod
    def rows(
        y: Tensor,
        m: Tensor,
        row: Tensor,
        *,
        x: Tensor | None = None,
        a: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """y m + row (− x ⊙ a): the elementwise part first, then the matmul accumulates onto it
        (BLAS beta = 1): one pass."""
        if x is None or a is None:
            return _rows_times(y, m, row, out=out)
        if torch.compiler.is_compiling():
            return torch.matmul(y, m) + torch.addcmul(row, x, a, value=-1.0)
        grad = torch.addcmul(row, x, a, value=-1.0)  # (B, H, N, d)
        for b in range(x.shape[0]):
            grad[b].baddbmm_(y[b], m[b])
        return grad

    @staticmethod
    def cross(q: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Qᵀ G (B, H, d, d) and G's token mean (B, H, 1, d)."""
        return q.mT @ g, g.sum(dim=-2, keepdim=True) / g.shape[-2]


def _triton_ops():
    from volumetric.layers.seqnorm_triton import TritonOps

    return TritonOps


_BACKENDS = {"torch": lambda: _TorchOps, "triton": _triton_ops}


def seqnorm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eps: float = EPS,
    *,
    normalize_v: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    centre: bool = True,
    backend: str | None = None,
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
        centre: subtract the token mean of Q and K (and of V when it is normalized) first, so
            that any inputs, raw intensities included, keep float32's precision; False for
            inputs centred already (the attention module centres its tokens), which saves the
            three copies. The result is the same either way: the normalization ignores means.
        backend: "torch" or "triton" (CUDA tensors only) for the passes over the tokens; None
            picks Triton on CUDA when it is installed (the benchmark compares the two).
    Returns:
        (B, H, N, d) in the dtype of ``v``; computed in float32 (statistics and products
        accumulated in float32), autocast disabled inside. On CUDA with Triton installed the
        passes over the tokens are Triton kernels (volumetric/layers/seqnorm_triton.py).
    """
    check_inputs(q, k, v, weight, bias, normalize_v)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        if weight is not None:  # and so is bias (check_inputs)
            weight, bias = weight.float(), cast(Tensor, bias).float()
        backend = _backend(q) if backend is None else _checked_backend(backend, q)
        if backend == "torch" or centre:  # Triton reads bf16/fp16 as they are, in float32
            q, k, v = q.float(), k.float(), v.float()
        if centre:  # autograd carries the gradient through the centring (it sums to zero)
            q, k = q - q.mean(dim=-2, keepdim=True), k - k.mean(dim=-2, keepdim=True)
            if normalize_v:
                v = v - v.mean(dim=-2, keepdim=True)
        out = _SeqNormAttentionFn.apply(q, k, v, weight, bias, eps, normalize_v, backend)
    return out.to(out_dtype)


def _checked_backend(backend: str, q: Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, not {backend!r}")
    from volumetric.layers.seqnorm_triton import interpreting

    if backend == "triton" and q.device.type != "cuda" and not interpreting():
        raise ValueError("the triton backend runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    return backend


def _backend(q: Tensor) -> str:
    """triton on CUDA when it is installed (and not inside torch.compile, which writes its own
    kernels), torch otherwise; CUDA without Triton says so once."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return "torch"
    from volumetric.layers.seqnorm_triton import available

    return "triton" if available() else "torch"

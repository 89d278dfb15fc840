"""Seq-norm attention's passes over the N tokens as Triton kernels (the CUDA backend of
`_SeqNormAttentionFn`, volumetric/layers/seqnorm_kernel.py, which keeps the d×d algebra).

Two kernels serve forward and backward:

    _stats   one pass over X and Y (B, H, N, d) in chunks of tokens: the per-feature sums and sums
             of squares of both, and Xᵀ Y (d×d), accumulated in float32 whatever the inputs'
             type. Forward: X = K, Y = V (their moments and Kᵀ V together, then K̂ᵀ V̂ follows
             from them algebraically: docs/method.md#the-fused-kernel), and X = Q alone (its
             moments; no product). Backward: X = Q, Y = G (Qᵀ G and G's mean).
    _rows    out = Y M + row − X ⊙ a on tiles of tokens, M a (d×d) matrix per (batch, head): the
             output Q P_q + row, and each input's gradient.

A program of ``_stats`` sums one chunk of tokens of one (batch, head) and writes its partial
sums; PyTorch adds the chunks (a fixed order: the result does not depend on scheduling). Head
widths that are not a power of two (e.g. 24) are padded to the next one (at least 16, what
``tl.dot`` takes) with masked loads. The products run in TF32 off ("ieee") so that the kernel
matches the float32 reference; bf16 and fp16 inputs are read as they are and accumulated in
float32.

``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (Triton's interpreter): the tests
check them against the float64 N×N reference there (tests/layers/test_triton.py).
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CHUNK_TOKENS = 4096
"""Tokens one program of ``_stats`` sums: enough chunks at 16k tokens and more to fill a GPU's
multiprocessors, few enough partial sums to add up cheaply."""
BLOCK_TOKENS = 64
"""Tokens a program loads at a time (rows of a tile)."""


@cache
def available() -> bool:
    """Whether Triton is installed; on CUDA without it, one log line that the PyTorch path runs."""
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("Triton is not installed: seq-norm attention runs its PyTorch path on CUDA")
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


tl: Any = None  # triton.language, imported with the kernels (a module global, as Triton's
# interpreter patches the kernels' globals)


@cache
def _kernels():
    global tl
    import triton
    import triton.language

    tl = triton.language

    @triton.jit
    def stats(
        x_ptr, y_ptr, sums_ptr, cross_ptr,  # sums: (BH, chunks, 4, D); cross: (BH, chunks, D, D)
        H, N, chunk, chunks, d,
        sxb, sxh, sxn, sxd, syb, syh, syn, syd,
        CROSS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        bh, c = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        cols = tl.arange(0, D)
        col_ok = cols < d
        sum_x = tl.zeros((D,), tl.float32)
        sq_x = tl.zeros((D,), tl.float32)
        sum_y = tl.zeros((D,), tl.float32)
        sq_y = tl.zeros((D,), tl.float32)
        acc = tl.zeros((D, D), tl.float32)
        start = c * chunk
        stop = tl.minimum(start + chunk, N)
        for n0 in range(start, stop, BLOCK):
            rows = n0 + tl.arange(0, BLOCK)
            ok = (rows < stop)[:, None] & col_ok[None, :]
            xp = x_ptr + b * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd
            x = tl.load(xp, mask=ok, other=0.0).to(tl.float32)  # (BLOCK, D)
            sum_x += tl.sum(x, axis=0)
            sq_x += tl.sum(x * x, axis=0)
            if CROSS:
                yp = y_ptr + b * syb + h * syh + rows[:, None] * syn + cols[None, :] * syd
                y = tl.load(yp, mask=ok, other=0.0).to(tl.float32)
                sum_y += tl.sum(y, axis=0)
                sq_y += tl.sum(y * y, axis=0)
                acc += tl.dot(tl.trans(x), y, input_precision="ieee")  # (D, D)
        base = (bh * chunks + c) * 4 * D
        tl.store(sums_ptr + base + cols, sum_x)
        tl.store(sums_ptr + base + D + cols, sq_x)
        tl.store(sums_ptr + base + 2 * D + cols, sum_y)
        tl.store(sums_ptr + base + 3 * D + cols, sq_y)
        if CROSS:
            cp = cross_ptr + (bh * chunks + c) * D * D + cols[:, None] * D + cols[None, :]
            tl.store(cp, acc)

    @triton.jit
    def rows_kernel(
        y_ptr, m_ptr, row_ptr, x_ptr, a_ptr, out_ptr,  # m: (BH, D, D); row, a: (BH, D)
        H, N, d,
        syb, syh, syn, syd, sxb, sxh, sxn, sxd, sob, soh, son, sod,
        HAS_X: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        bh, tile = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        cols = tl.arange(0, D)
        col_ok = cols < d
        rows = tile * BLOCK + tl.arange(0, BLOCK)
        ok = (rows < N)[:, None] & col_ok[None, :]
        yp = y_ptr + b * syb + h * syh + rows[:, None] * syn + cols[None, :] * syd
        y = tl.load(yp, mask=ok, other=0.0).to(tl.float32)  # (BLOCK, D)
        m = tl.load(m_ptr + bh * D * D + cols[:, None] * D + cols[None, :])  # (D, D) fp32
        result = tl.dot(y, m, input_precision="ieee")
        result += tl.load(row_ptr + bh * D + cols)[None, :]
        if HAS_X:
            xp = x_ptr + b * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd
            x = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
            result -= x * tl.load(a_ptr + bh * D + cols)[None, :]
        op = out_ptr + b * sob + h * soh + rows[:, None] * son + cols[None, :] * sod
        tl.store(op, result.to(out_ptr.dtype.element_ty), mask=ok)

    return stats, rows_kernel


def _width(d: int) -> int:
    """The padded head width: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def _pad(t: Tensor, width: int) -> Tensor:
    """A (B, H, r, c) small tensor as float32 (B·H, width, width) or (B·H, width), zero-padded."""
    t = t.float()
    b, h = t.shape[:2]
    if t.shape[-2] == 1:  # a row (B, H, 1, d)
        out = t.new_zeros(b * h, width)
        out[:, : t.shape[-1]] = t.reshape(b * h, -1)
        return out.contiguous()
    out = t.new_zeros(b * h, width, width)
    out[:, : t.shape[-2], : t.shape[-1]] = t.reshape(b * h, t.shape[-2], t.shape[-1])
    return out.contiguous()


def stats(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Σx, Σx², Σy, Σy² (each (B, H, 1, d)) and Xᵀ Y (B, H, d, d; None without ``y``) over the
    N tokens of (B, H, N, d) inputs, in float32."""
    stats_kernel, _ = _kernels()
    b, h, n, d = x.shape
    width, chunks = _width(d), max(1, -(-n // CHUNK_TOKENS))
    sums = x.new_empty(b * h, chunks, 4, width, dtype=torch.float32)
    cross = x.new_empty(b * h, chunks, width, width, dtype=torch.float32) if y is not None else sums
    other = y if y is not None else x
    stats_kernel[(b * h, chunks)](
        x, other, sums, cross, h, n, CHUNK_TOKENS, chunks, d,
        *x.stride(), *other.stride(),
        CROSS=y is not None, D=width, BLOCK=BLOCK_TOKENS,
    )  # fmt: skip
    totals = sums.sum(dim=1)[..., :d].reshape(b, h, 4, 1, d)  # chunks added in a fixed order
    product = None
    if y is not None:
        product = cross.sum(dim=1)[:, :d, :d].reshape(b, h, d, d)
    return totals[:, :, 0], totals[:, :, 1], totals[:, :, 2], totals[:, :, 3], product


def rows(
    y: Tensor,
    m: Tensor,
    row: Tensor,
    *,
    x: Tensor | None = None,
    a: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y m + row (− x ⊙ a) for y, x (B, H, N, d), m (B, H, d, d), row, a (B, H, 1, d), into
    ``out`` (any strides; default: a new tensor like y)."""
    _, rows_kernel = _kernels()
    b, h, n, d = y.shape
    width = _width(d)
    if out is None:
        out = torch.empty_like(y)
    xs, scale = (x, a) if x is not None and a is not None else (y, row)  # unused without x
    rows_kernel[(b * h, -(-n // BLOCK_TOKENS))](
        y, _pad(m, width), _pad(row, width), xs, _pad(scale, width), out,
        h, n, d, *y.stride(), *xs.stride(), *out.stride(),
        HAS_X=x is not None and a is not None, D=width, BLOCK=BLOCK_TOKENS,
    )  # fmt: skip
    return out


class TritonOps:
    """The passes of `_SeqNormAttentionFn` with the kernels above (see `_TorchOps`)."""

    @staticmethod
    def forward_stats(q: Tensor, k: Tensor, v: Tensor, normalize_v: bool):
        n = q.shape[-2]
        sum_q, sq_q, _, _, _ = stats(q, None)
        sum_k, sq_k, sum_v, sq_v, kv = stats(k, v)
        assert kv is not None  # asked for: y given
        mean = torch.stack([sum_q, sum_k, sum_v]) / n  # (3, B, H, 1, d)
        square = torch.stack([sq_q, sq_k, sq_v]) / n
        var = (square - mean * mean).clamp_min(0.0)
        mu_k, mu_v = mean[1], mean[2]
        kv = kv - n * (mu_k.mT @ mu_v)  # (K − μ_k)ᵀ (V − μ_v), K̂ centred: exact to rounding
        if normalize_v:
            return mean, var, mu_v, kv
        return mean[:2], var[:2], mu_v, kv

    @staticmethod
    def rows(y, m, row, *, x=None, a=None, out=None) -> Tensor:
        return rows(y, m, row, x=x, a=a, out=out)

    @staticmethod
    def cross(q: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        _, _, sum_g, _, qtg = stats(q, g)
        assert qtg is not None
        return qtg, sum_g / g.shape[-2]

"""The Triton backend of seq-norm attention (volumetric/layers/seqnorm_triton.py) against the
float64 N×N reference, forward and backward, run on the CPU by Triton's interpreter
(TRITON_INTERPRET=1): the same kernels a GPU compiles, checked where there is none."""

from __future__ import annotations

import os

import pytest
import torch

from volumetric.layers import seqnorm_triton
from volumetric.layers.attention_functional import EPS, seqnorm_attention_reference
from volumetric.layers.seqnorm_kernel import _SeqNormAttentionFn, seqnorm_attention

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "Triton's interpreter was not chosen before triton was imported (conftest.py)",
        allow_module_level=True,
    )


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: interpreted


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    seqnorm_triton._kernels.cache_clear()
    yield
    seqnorm_triton._kernels.cache_clear()


def centred(b, h, n, d, normalize_v, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, h, n, d, generator=generator, dtype=dtype).to(DEVICE) for _ in range(3)
    )
    q, k = q - q.mean(-2, keepdim=True), k - k.mean(-2, keepdim=True)
    if normalize_v:
        v = v - v.mean(-2, keepdim=True)
    else:
        v = v + 2.0  # V raw in seqnorm_qk: its mean stays (and matters to the affine)
    return q, k, v


@pytest.mark.parametrize("normalize_v", [True, False], ids=["seqnorm", "seqnorm_qk"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("b,h,n,d", [(1, 1, 70, 16), (2, 2, 130, 24), (1, 3, 65, 32), (1, 1, 5, 8)])
def test_triton_matches_the_float64_reference(normalize_v, affine, b, h, n, d):
    """Forward and every gradient, head widths that are powers of two and not (24, 8: padded),
    token counts that are not multiples of the tile."""
    q, k, v = centred(b, h, n, d, normalize_v)
    generator = torch.Generator().manual_seed(1)
    weight = bias = None
    if affine:
        weight = 1.0 + 0.3 * torch.randn(3 if normalize_v else 2, h, d, generator=generator)
        bias = 0.3 * torch.randn(1 if normalize_v else 2, h, d, generator=generator)
        weight, bias = weight.to(DEVICE), bias.to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, weight, bias) if t is not None]
    args = leaves + [None] * (5 - len(leaves))
    out = _SeqNormAttentionFn.apply(*args, EPS, normalize_v, "triton")
    grad_out = torch.randn(out.shape, generator=generator).to(DEVICE)
    (out * grad_out).sum().backward()
    exact = [t.detach().double().requires_grad_() for t in leaves]
    exact_args = exact + [None] * (5 - len(exact))
    reference = seqnorm_attention_reference(
        *exact_args[:3], normalize_v=normalize_v, weight=exact_args[3], bias=exact_args[4]
    )
    (reference * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(leaves, exact):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=5e-5)


def test_triton_and_torch_backends_agree_and_chunks_add_up(monkeypatch):
    """More tokens than one chunk (the partial sums of several programs added): the two
    backends give the same output."""
    monkeypatch.setattr(seqnorm_triton, "CHUNK_TOKENS", 64)
    q, k, v = centred(1, 2, 300, 16, True, seed=3)
    torch_out = _SeqNormAttentionFn.apply(q, k, v, None, None, EPS, True, "torch")
    triton_out = _SeqNormAttentionFn.apply(q, k, v, None, None, EPS, True, "triton")
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_are_accumulated_in_float32():
    q, k, v = centred(1, 2, 200, 16, True, seed=4)
    out = _SeqNormAttentionFn.apply(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, EPS, True, "triton"
    )
    assert out.dtype == torch.bfloat16
    exact = seqnorm_attention_reference(
        q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double()
    )
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)  # bf16 output rounding


def test_the_backend_can_be_named_and_a_wrong_name_is_refused():
    """seqnorm_attention(backend=...) as the benchmark calls it: both backends agree on raw
    (uncentred) inputs; a name that is no backend is a ValueError naming the choices."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (3.0 + torch.randn(1, 2, 90, 16, generator=generator).to(DEVICE) for _ in range(3))
    by_torch = seqnorm_attention(q, k, v, backend="torch")
    by_triton = seqnorm_attention(q, k, v, backend="triton")
    torch.testing.assert_close(by_triton, by_torch, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'torch', 'triton'"):
        seqnorm_attention(q, k, v, backend="cuda")

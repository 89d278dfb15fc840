"""Seq-norm attention: the fused linear form against the explicit N×N form, gradients, numerics,
autocast, and the attention module registry."""

from __future__ import annotations

import pytest
import torch

from volumetric.layers.attention import (
    ATTENTION,
    EPS,
    _SeqNormAttentionFn,
    build_attention,
    seqnorm_attention,
    seqnorm_attention_reference,
)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Q̂ K̂ᵀ V / N with the N×N matrix formed, written out independently of the library (float64)."""
    q, k, v = q.double(), k.double(), v.double()
    n = q.shape[-2]

    def normalize(x):
        mean = x.sum(dim=-2, keepdim=True) / n
        std = ((x - mean) ** 2).sum(dim=-2, keepdim=True).div(n).sqrt()  # population std
        return (x - mean) / (std + eps)

    scores = normalize(q) @ normalize(k).transpose(-1, -2)  # (B, H, N, N)
    return scores @ v / n


def qkv(b, h, n, d, dtype=torch.float64, scale=1.0, shift=0.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale + shift).requires_grad_(
            requires_grad
        )
        for _ in range(3)
    ]


SHAPES = [
    (1, 1, 1, 4),
    (1, 1, 2, 4),
    (2, 1, 7, 8),
    (1, 3, 16, 4),
    (3, 2, 33, 8),
    (2, 4, 64, 16),
    (4, 1, 5, 3),
]


@pytest.mark.parametrize("b,h,n,d", SHAPES)
def test_fused_float64_equals_explicit_nxn(b, h, n, d):
    q, k, v = qkv(b, h, n, d)
    out = _SeqNormAttentionFn.apply(q, k, v, EPS)
    assert out.shape == (b, h, n, d)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, explicit_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b,h,n,d", SHAPES)
def test_public_float32_close_to_float64_explicit(b, h, n, d):
    q, k, v = qkv(b, h, n, d)
    out = seqnorm_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v), rtol=1e-4, atol=1e-4)


def test_n_equals_one_gives_zero_output():
    """One token: the centred Q̂ and K̂ are zero, so the output is exactly zero (and finite)."""
    q, k, v = qkv(2, 3, 1, 4)
    out = _SeqNormAttentionFn.apply(q, k, v, EPS)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out))


def test_non_contiguous_inputs():
    """Strided views (as produced by the qkv permute in the module) give the same result."""
    x = torch.randn(2, 12, 3, 2, 4, dtype=torch.float64)  # (B, N, 3, H, d)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = _SeqNormAttentionFn.apply(q, k, v, EPS)
    torch.testing.assert_close(
        out, explicit_attention(q.contiguous(), k.contiguous(), v.contiguous())
    )


def test_shape_mismatch_raises():
    q, k, v = qkv(1, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError):
        seqnorm_attention(q, k[..., :3, :], v)
    with pytest.raises(ValueError):
        seqnorm_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])


# -------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 3, 2), (2, 2, 5, 3), (1, 2, 1, 2)])
def test_gradcheck(b, h, n, d):
    q, k, v = qkv(b, h, n, d, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: _SeqNormAttentionFn.apply(q, k, v, EPS), (q, k, v)
    )


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 9, 4), (2, 3, 17, 8), (3, 2, 64, 16)])
def test_fused_gradients_equal_reference(b, h, n, d):
    q, k, v = qkv(b, h, n, d, dtype=torch.float32, requires_grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    weight = torch.randn(b, h, n, d)
    (seqnorm_attention(q, k, v) * weight).sum().backward()
    (seqnorm_attention_reference(q2, k2, v2) * weight).sum().backward()
    for fused, ref in ((q, q2), (k, k2), (v, v2)):
        assert fused.grad is not None and torch.count_nonzero(fused.grad) > 0
        torch.testing.assert_close(fused.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_only_some_inputs_require_grad():
    q, k, v = qkv(1, 2, 6, 4)
    v.requires_grad_(True)
    out = _SeqNormAttentionFn.apply(q, k, v, EPS)
    out.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    assert q.grad is None and k.grad is None


# -------------------------------------------------------------------------------------- numerics


def test_constant_features_finite_outputs_and_gradients():
    q, k, v = qkv(2, 2, 10, 4, dtype=torch.float32)
    q[..., 0] = 3.0  # one feature identical across every token
    k[..., 1] = -2.0
    k[0, 1] = 5.0  # every feature of one head of k constant
    v[..., 2] = 1.0
    for t in (q, k, v):
        t.requires_grad_(True)
    out = seqnorm_attention(q, k, v)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # a head whose keys are all constant has K̂ = 0, so its output is exactly zero
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


def test_constant_features_float64_match_explicit():
    """In float64 the fused path treats a constant feature as Q̂ = 0 / K̂ = 0, as the explicit form does."""
    q, k, v = qkv(2, 2, 12, 4)
    q[..., 0] = 3.0
    k[..., 1] = -2.0
    v[..., 2] = 1.0
    v.requires_grad_(True)
    out = _SeqNormAttentionFn.apply(q, k, v, EPS)
    torch.testing.assert_close(out, explicit_attention(q, k, v), rtol=1e-9, atol=1e-9)
    weight = torch.randn_like(out)
    (grad_v,) = torch.autograd.grad((out * weight).sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((explicit_attention(q, k, v2) * weight).sum(), v2)
    torch.testing.assert_close(grad_v, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("value", [10.0, 100.0])
def test_constant_query_feature_output_accurate_in_float32(value):
    """A query feature equal to `value` on every token has Q̂ = 0 exactly, and the plain form computes
    the output in float32 to ~1e-7. The fused form folds 1/(σ+ε) = 1/ε = 1e5 into diag(r_q)·S and then
    subtracts Q·(r_q S) − μ_q·(r_q S): a cancellation of two ~value·1e5 terms in float32."""
    q, k, v = qkv(1, 1, 16, 4)
    q[..., 0] = value
    expected = explicit_attention(q, k, v)
    out = seqnorm_attention(q.float(), k.float(), v.float()).double()
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 1e-3, f"relative error {rel:.2e} with a constant query feature of {value}"


@pytest.mark.parametrize("which", ["q", "k"])
def test_constant_feature_value_gradient_accurate_in_float32(which):
    """∂out/∂v is well defined (out is linear in v, Q̂ and K̂ of a constant feature are 0), so the float32
    gradient should match the float64 explicit one; the folded backward has the same 1/ε cancellation."""
    q, k, v = qkv(1, 1, 16, 4)
    (q if which == "q" else k)[..., 0] = 100.0
    weight = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    v64 = v.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((explicit_attention(q, k, v64) * weight).sum(), v64)
    v32 = v.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        (seqnorm_attention(q.float(), k.float(), v32) * weight.float()).sum(), v32
    )
    rel = ((grad.double() - expected).norm() / expected.norm()).item()
    assert rel < 1e-3, f"relative error {rel:.2e} of dL/dv with a constant {which} feature"


def test_all_constant_inputs_give_zero():
    q = torch.full((1, 1, 8, 4), 2.0, requires_grad=True)
    k = torch.full((1, 1, 8, 4), -1.0, requires_grad=True)
    v = torch.full((1, 1, 8, 4), 7.0, requires_grad=True)
    out = seqnorm_attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("b,h,n,d", [(1, 1, 64, 8), (2, 2, 50, 4)])
def test_large_means_accurate_in_float32(b, h, n, d):
    q, k, v = qkv(b, h, n, d, shift=1000.0)  # ~1000 ± 1, float64
    expected = explicit_attention(q, k, v)
    out = seqnorm_attention(q.float(), k.float(), v.float()).double()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"


def test_large_means_moderate_ratio_fast_path_accurate():
    """|mean|/std just under the 32σ switch to the exact moments: the fast path must still be accurate."""
    q, k, v = qkv(1, 2, 64, 8, shift=30.0)
    expected = explicit_attention(q, k, v)
    out = seqnorm_attention(q.float(), k.float(), v.float()).double()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"


def test_large_means_gradients_accurate_in_float32():
    q, k, v = qkv(1, 2, 40, 4, shift=1000.0, requires_grad=True)
    weight = torch.randn(1, 2, 40, 4, dtype=torch.float64)
    (explicit_attention(q, k, v) * weight).sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    (seqnorm_attention(q32, k32, v32) * weight.float()).sum().backward()
    for fused, ref in ((q32, q), (k32, k), (v32, v)):
        rel = (fused.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert rel < 1e-3, f"relative gradient error {rel:.2e}"


# -------------------------------------------------------------------------------------- autocast


def test_autocast_bfloat16_on_cpu():
    q, k, v = qkv(2, 2, 32, 8, dtype=torch.float32)
    expected = seqnorm_attention(q, k, v)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = seqnorm_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_autocast_float32_inputs_keep_float32():
    q, k, v = qkv(1, 2, 16, 4, dtype=torch.float32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = seqnorm_attention(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, seqnorm_attention(q, k, v))


def test_autocast_module_bfloat16():
    attn = build_attention("seqnorm", dim=16, num_heads=2)
    x = torch.randn(2, 20, 16)
    expected = attn(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


# -------------------------------------------------------------------------------------- registry


def test_registry_names():
    assert {"seqnorm", "softmax"} <= set(ATTENTION)


@pytest.mark.parametrize("kind", ["seqnorm", "softmax"])
@pytest.mark.parametrize("b,n,c,heads", [(1, 1, 8, 1), (2, 27, 24, 3), (3, 10, 16, 4)])
def test_modules_map_bnc_to_bnc(kind, b, n, c, heads):
    attn = build_attention(kind, dim=c, num_heads=heads)
    assert isinstance(attn, ATTENTION[kind])
    x = torch.randn(b, n, c, requires_grad=True)
    out = attn(x)
    assert out.shape == (b, n, c)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_build_attention_unknown_kind():
    with pytest.raises(ValueError, match="bogus"):
        build_attention("bogus", dim=16, num_heads=2)


@pytest.mark.parametrize("dim,heads", [(10, 3), (16, 0), (0, 2)])
def test_build_attention_bad_dims(dim, heads):
    with pytest.raises(ValueError, match="num_heads"):
        build_attention("seqnorm", dim=dim, num_heads=heads)


def test_qkv_bias_flag():
    assert build_attention("softmax", dim=8, num_heads=2, qkv_bias=False).qkv.bias is None
    assert build_attention("softmax", dim=8, num_heads=2).qkv.bias is not None


def test_softmax_module_matches_hand_written():
    torch.manual_seed(1)
    b, n, c, heads = 2, 11, 24, 3
    d = c // heads
    attn = build_attention("softmax", dim=c, num_heads=heads).double()
    x = torch.randn(b, n, c, dtype=torch.float64)
    q, k, v = (attn.qkv(x)).split(c, dim=-1)  # each (B, N, C), heads consecutive in C
    heads_of = lambda t: t.view(b, n, heads, d).transpose(1, 2)  # noqa: E731  (B, H, N, d)
    q, k, v = heads_of(q), heads_of(k), heads_of(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # (B, H, N, N)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x), expected)


def test_seqnorm_module_matches_hand_written():
    torch.manual_seed(2)
    b, n, c, heads = 2, 13, 16, 4
    d = c // heads
    attn = build_attention("seqnorm", dim=c, num_heads=heads)
    x = torch.randn(b, n, c)
    q, k, v = attn.qkv(x).double().split(c, dim=-1)
    heads_of = lambda t: t.view(b, n, heads, d).transpose(1, 2)  # noqa: E731
    out = explicit_attention(heads_of(q), heads_of(k), heads_of(v))  # (B, H, N, d)
    expected = attn.proj(out.transpose(1, 2).reshape(b, n, c).float())
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)

"""Attention variants: the fused linear forms against the explicit N×N forms, gradients, numerics,
autocast, and the attention module registry.

Variants: ``seqnorm`` (Q, K, V sequence-normalized), ``seqnorm_qk`` (Q, K only, V raw), either
with the learnable affine, and ``sima`` (Q, K L1-normalized over the tokens)."""

from __future__ import annotations

import pytest
import torch

from volumetric.layers.attention import (
    ATTENTION,
    V_SCALE_INIT,
    build_attention,
    supports_affine,
)
from volumetric.layers.attention_functional import (
    EPS,
    SIMA_EPS,
    affine_shapes,
    seqnorm_attention_plain,
    seqnorm_attention_reference,
    sima_attention,
)
from volumetric.layers.seqnorm_kernel import _SeqNormAttentionFn, seqnorm_attention

VARIANTS = ["seqnorm", "seqnorm_qk", "seqnorm+affine", "seqnorm_qk+affine", "sima"]
SEQNORM_VARIANTS = [v for v in VARIANTS if v != "sima"]


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "seqnorm",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """The attention with the N×N matrix formed, written out independently of the library
    (float64). The affine is applied to the (N, d) normalized tokens: scales of Q̂, K̂ (and V̂),
    shifts of Q̂ (and of K̂ in seqnorm_qk)."""
    q, k, v = q.double(), k.double(), v.double()
    n = q.shape[-2]
    if kind == "sima":

        def l1(x):  # each feature divided by its L1 norm over the tokens, as F.normalize does
            return x / x.abs().sum(dim=-2, keepdim=True).clamp_min(SIMA_EPS)

        return (l1(q) @ l1(k).transpose(-1, -2)) @ v  # (B, H, N, N) first

    def normalize(x):
        mean = x.sum(dim=-2, keepdim=True) / n
        var = ((x - mean) ** 2).sum(dim=-2, keepdim=True).div(n)  # population variance
        # clamped under the root so that autograd through a constant feature gives 0, the limit
        # (√ has an infinite slope at 0; the term it feeds is multiplied by x − mean = 0)
        std = var.clamp_min(1e-300).sqrt()
        return (x - mean) / (std + eps)

    q_hat, k_hat = normalize(q), normalize(k)
    v_hat = normalize(v) if kind == "seqnorm" else v
    if weight is not None:
        weight, bias = weight.double(), bias.double()
        q_hat = q_hat * weight[0][:, None, :] + bias[0][:, None, :]  # (H, 1, d) broadcasts
        k_hat = k_hat * weight[1][:, None, :]
        if kind == "seqnorm":
            v_hat = v_hat * weight[2][:, None, :]
        else:
            k_hat = k_hat + bias[1][:, None, :]
    scores = q_hat @ k_hat.transpose(-1, -2)  # (B, H, N, N)
    return scores @ v_hat / n


def qkv(b, h, n, d, dtype=torch.float64, scale=1.0, shift=0.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale + shift).requires_grad_(
            requires_grad
        )
        for _ in range(3)
    ]


def random_affine(variant, h, d, dtype=torch.float64, seed=5, requires_grad=False):
    """A non-trivial affine for the variant (None, None without one)."""
    if not variant.endswith("+affine"):
        return None, None
    g = torch.Generator().manual_seed(seed)
    scales, shifts = affine_shapes(not variant.startswith("seqnorm_qk"), h, d)
    weight = 1.0 + 0.5 * torch.randn(scales, generator=g, dtype=dtype)
    bias = 0.5 * torch.randn(shifts, generator=g, dtype=dtype)
    return weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad)


def kind_of(variant: str) -> str:
    return variant.removesuffix("+affine")


def fused(variant, q, k, v, weight=None, bias=None):
    """The production Function in the inputs' own dtype (float64 here), or SimA."""
    if variant == "sima":
        return sima_attention(q, k, v)
    normalize_v = kind_of(variant) == "seqnorm"
    return _SeqNormAttentionFn.apply(q, k, v, weight, bias, EPS, normalize_v, "torch")


def public(variant, q, k, v, weight=None, bias=None):
    """The public float32 entry point of the variant."""
    if variant == "sima":
        return sima_attention(q, k, v)
    normalize_v = kind_of(variant) == "seqnorm"
    return seqnorm_attention(q, k, v, normalize_v=normalize_v, weight=weight, bias=bias)


SHAPES = [
    (1, 1, 1, 4),
    (1, 1, 2, 4),
    (2, 1, 7, 8),
    (1, 3, 16, 4),
    (3, 2, 33, 8),
    (2, 4, 64, 16),
    (4, 1, 5, 3),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,h,n,d", SHAPES)
def test_fused_float64_equals_explicit_nxn(variant, b, h, n, d):
    q, k, v = qkv(b, h, n, d)
    weight, bias = random_affine(variant, h, d)
    out = fused(variant, q, k, v, weight, bias)
    assert out.shape == (b, h, n, d)
    assert out.dtype == torch.float64
    expected = explicit_attention(q, k, v, kind_of(variant), weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,h,n,d", SHAPES)
def test_public_float32_close_to_float64_explicit(variant, b, h, n, d):
    q, k, v = qkv(b, h, n, d)
    weight, bias = random_affine(variant, h, d)
    f32 = (None, None) if weight is None else (weight.float(), bias.float())
    out = public(variant, q.float(), k.float(), v.float(), *f32)
    assert out.dtype == torch.float32
    expected = explicit_attention(q, k, v, kind_of(variant), weight, bias)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", SEQNORM_VARIANTS)
def test_reference_and_plain_forms_equal_the_fused_one(variant):
    """The unfused reference (affine on the (N, d) tokens) and the export form (affine folded)
    agree with the Function in float64."""
    q, k, v = qkv(2, 3, 21, 4)
    weight, bias = random_affine(variant, 3, 4)
    options = dict(normalize_v=kind_of(variant) == "seqnorm", weight=weight, bias=bias)
    out = fused(variant, q, k, v, weight, bias)
    torch.testing.assert_close(seqnorm_attention_reference(q, k, v, **options), out)
    torch.testing.assert_close(seqnorm_attention_plain(q, k, v, **options), out)


def test_the_mean_of_v_never_reaches_the_output():
    """K̂ is centred, so K̂ᵀ(V + 1 cᵀ) = K̂ᵀ V: the mean of V drops out of both seq-norm forms,
    and seqnorm (V normalized) is also blind to a positive per-feature scale of V."""
    q, k, v = qkv(2, 2, 19, 4)
    shift = torch.randn(2, 2, 1, 4, dtype=torch.float64) * 10.0
    scale = torch.rand(2, 2, 1, 4, dtype=torch.float64) * 5.0 + 0.1
    for variant in ("seqnorm", "seqnorm_qk"):
        torch.testing.assert_close(fused(variant, q, k, v + shift), fused(variant, q, k, v))
    torch.testing.assert_close(
        fused("seqnorm", q, k, v * scale + shift),
        fused("seqnorm", q, k, v),
        rtol=1e-3,  # ε = 1e-5 beside stds of order 0.1 to 5: changes of order ε/σ
        atol=1e-3,
    )


def test_identity_affine_changes_nothing():
    q, k, v = qkv(2, 2, 12, 4)
    for normalize_v in (True, False):
        scales, shifts = affine_shapes(normalize_v, 2, 4)
        weight = torch.ones(scales, dtype=torch.float64)
        bias = torch.zeros(shifts, dtype=torch.float64)
        with_affine = _SeqNormAttentionFn.apply(q, k, v, weight, bias, EPS, normalize_v, "torch")
        without = _SeqNormAttentionFn.apply(q, k, v, None, None, EPS, normalize_v, "torch")
        torch.testing.assert_close(with_affine, without, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", SEQNORM_VARIANTS)
def test_n_equals_one(variant):
    """One token: the centred Q̂ and K̂ are zero, so the output is exactly zero, or β_q T with the
    affine (finite in any case)."""
    q, k, v = qkv(2, 3, 1, 4)
    weight, bias = random_affine(variant, 3, 4)
    out = fused(variant, q, k, v, weight, bias)
    assert torch.isfinite(out).all()
    if weight is None:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        torch.testing.assert_close(out, explicit_attention(q, k, v, kind_of(variant), weight, bias))


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_inputs(variant):
    """Strided views (as produced by the qkv permute in the module) give the same result."""
    x = torch.randn(2, 12, 3, 2, 4, dtype=torch.float64)  # (B, N, 3, H, d)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    weight, bias = random_affine(variant, 2, 4)
    out = fused(variant, q, k, v, weight, bias)
    expected = explicit_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), kind_of(variant), weight, bias
    )
    torch.testing.assert_close(out, expected)


def test_shape_mismatch_raises():
    q, k, v = qkv(1, 1, 4, 4, dtype=torch.float32)
    for fn in (seqnorm_attention, sima_attention):
        with pytest.raises(ValueError):
            fn(q, k[..., :3, :], v)
        with pytest.raises(ValueError):
            fn(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])


def test_affine_shapes_are_checked():
    q, k, v = qkv(1, 2, 4, 4, dtype=torch.float32)
    scales, shifts = affine_shapes(True, 2, 4)
    assert (scales, shifts) == ((3, 2, 4), (1, 2, 4))
    assert affine_shapes(False, 2, 4) == ((2, 2, 4), (2, 2, 4))
    with pytest.raises(ValueError, match="both or neither"):
        seqnorm_attention(q, k, v, weight=torch.ones(scales))
    with pytest.raises(ValueError, match="weight and bias"):
        seqnorm_attention(
            q, k, v, normalize_v=False, weight=torch.ones(scales), bias=torch.ones(shifts)
        )


# -------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", SEQNORM_VARIANTS)
@pytest.mark.parametrize("b,h,n,d", [(1, 1, 3, 2), (2, 2, 5, 3), (1, 2, 1, 2)])
def test_gradcheck(variant, b, h, n, d):
    """The fused Function's backward, for Q, K, V and, with the affine, its scales and shifts."""
    q, k, v = qkv(b, h, n, d, requires_grad=True)
    weight, bias = random_affine(variant, h, d, requires_grad=True)
    if weight is None:
        assert torch.autograd.gradcheck(lambda q, k, v: fused(variant, q, k, v), (q, k, v))
    else:
        assert torch.autograd.gradcheck(
            lambda *args: fused(variant, *args), (q, k, v, weight, bias)
        )


def centred_then_fused(variant, q, k, v, *affine):
    """What `seqnorm_attention` does by default: centre Q, K (and a normalized V) over the
    tokens, then the Function (no branch on the values)."""
    q, k = q - q.mean(-2, keepdim=True), k - k.mean(-2, keepdim=True)
    if kind_of(variant) == "seqnorm":
        v = v - v.mean(-2, keepdim=True)
    return fused(variant, q, k, v, *affine)


@pytest.mark.parametrize("ill", ["q", "k", "v"])
@pytest.mark.parametrize("variant", ["seqnorm", "seqnorm_qk+affine"])
def test_gradcheck_of_ill_conditioned_inputs(variant, ill):
    """One input with |mean| ≫ std (raw intensities): centred first, the gradients are exact,
    through the centring (V raw in seqnorm_qk, whose mean the affine's fold uses)."""
    q, k, v = qkv(2, 2, 6, 3)
    {"q": q, "k": k, "v": v}[ill].add_(500.0)
    for t in (q, k, v):
        t.requires_grad_(True)
    weight, bias = random_affine(variant, 2, 3, requires_grad=True)
    args = (q, k, v) if weight is None else (q, k, v, weight, bias)
    assert torch.autograd.gradcheck(lambda *a: centred_then_fused(variant, *a), args)


def test_sima_gradcheck():
    q, k, v = qkv(2, 2, 5, 3, requires_grad=True)
    assert torch.autograd.gradcheck(sima_attention, (q, k, v))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,h,n,d", [(1, 1, 9, 4), (2, 3, 17, 8), (3, 2, 64, 16)])
def test_fused_gradients_equal_explicit(variant, b, h, n, d):
    q, k, v = qkv(b, h, n, d, dtype=torch.float32, requires_grad=True)
    weight, bias = random_affine(variant, h, d, dtype=torch.float32, requires_grad=True)
    leaves = [t for t in (q, k, v, weight, bias) if t is not None]
    copies = [t.detach().double().requires_grad_(True) for t in leaves]
    out_weight = torch.randn(b, h, n, d)
    (public(variant, q, k, v, weight, bias) * out_weight).sum().backward()
    args = copies + [None] * (5 - len(copies))
    (explicit_attention(*args[:3], kind_of(variant), *args[3:]) * out_weight).sum().backward()
    for mine, ref in zip(leaves, copies):
        assert mine.grad is not None and torch.count_nonzero(mine.grad) > 0
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_some_inputs_require_grad(variant):
    q, k, v = qkv(1, 2, 6, 4)
    weight, bias = random_affine(variant, 2, 4)
    v.requires_grad_(True)
    out = fused(variant, q, k, v, weight, bias)
    out.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    assert q.grad is None and k.grad is None


# -------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_features_finite_outputs_and_gradients(variant):
    q, k, v = qkv(2, 2, 10, 4, dtype=torch.float32)
    q[..., 0] = 3.0  # one feature identical across every token
    k[..., 1] = -2.0
    k[0, 1] = 5.0  # every feature of one head of k constant
    v[..., 2] = 1.0
    v[1, 0] = 0.1  # every feature of one head of v constant, at a value float32 cannot hold
    weight, bias = random_affine(variant, 2, 4, dtype=torch.float32, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = public(variant, q, k, v, weight, bias)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (q, k, v, weight, bias):
        assert t is None or (t.grad is not None and torch.isfinite(t.grad).all())
    if variant in ("seqnorm", "seqnorm_qk"):
        # a head whose keys are all constant has K̂ = 0, so its output is exactly zero
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


@pytest.mark.parametrize("variant", SEQNORM_VARIANTS)
def test_constant_features_float64_match_explicit(variant):
    """In float64 the fused path (inputs centred first, as `seqnorm_attention` and the module
    do) treats a constant feature as X̂ = 0, as the explicit form does."""
    q, k, v = qkv(2, 2, 12, 4)
    q[..., 0] = 3.0
    k[..., 1] = -2.0
    v[..., 2] = 1.0
    weight, bias = random_affine(variant, 2, 4)
    v.requires_grad_(True)
    out = centred_then_fused(variant, q, k, v, weight, bias)
    expected_out = explicit_attention(q, k, v, kind_of(variant), weight, bias)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-9)
    out_weight = torch.randn_like(out)
    (grad_v,) = torch.autograd.grad((out * out_weight).sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    explicit = explicit_attention(q, k, v2, kind_of(variant), weight, bias)
    (expected,) = torch.autograd.grad((explicit * out_weight).sum(), v2)
    torch.testing.assert_close(grad_v, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
@pytest.mark.parametrize("value", [10.0, 100.0])
def test_constant_query_feature_output_accurate_in_float32(kind, value):
    """A query feature equal to `value` on every token has Q̂ = 0 exactly, and the plain form computes
    the output in float32 to ~1e-7. The fused form folds 1/(σ+ε) = 1/ε = 1e5 into diag(r_q)·S and then
    subtracts Q·(r_q S) − μ_q·(r_q S): a cancellation of two ~value·1e5 terms in float32."""
    q, k, v = qkv(1, 1, 16, 4)
    q[..., 0] = value
    expected = explicit_attention(q, k, v, kind)
    out = public(kind, q.float(), k.float(), v.float()).double()
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 1e-3, f"relative error {rel:.2e} with a constant query feature of {value}"


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
@pytest.mark.parametrize("which", ["q", "k"])
def test_constant_feature_value_gradient_accurate_in_float32(kind, which):
    """∂out/∂v is well defined (Q̂ and K̂ of a constant feature are 0), so the float32 gradient
    should match the float64 explicit one; the folded backward has the same 1/ε cancellation."""
    q, k, v = qkv(1, 1, 16, 4)
    (q if which == "q" else k)[..., 0] = 100.0
    weight = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    v64 = v.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((explicit_attention(q, k, v64, kind) * weight).sum(), v64)
    v32 = v.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        (public(kind, q.float(), k.float(), v32) * weight.float()).sum(), v32
    )
    rel = ((grad.double() - expected).norm() / expected.norm()).item()
    assert rel < 1e-3, f"relative error {rel:.2e} of dL/dv with a constant {which} feature"


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
def test_all_constant_inputs_give_zero(kind):
    q = torch.full((1, 1, 8, 4), 2.0, requires_grad=True)
    k = torch.full((1, 1, 8, 4), -1.0, requires_grad=True)
    v = torch.full((1, 1, 8, 4), 7.0, requires_grad=True)
    out = public(kind, q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,h,n,d", [(1, 1, 64, 8), (2, 2, 50, 4)])
def test_large_means_accurate_in_float32(variant, b, h, n, d):
    q, k, v = qkv(b, h, n, d, shift=1000.0)  # ~1000 ± 1, float64
    weight, bias = random_affine(variant, h, d)
    expected = explicit_attention(q, k, v, kind_of(variant), weight, bias)
    f32 = (None, None) if weight is None else (weight.float(), bias.float())
    out = public(variant, q.float(), k.float(), v.float(), *f32).double()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
def test_large_means_moderate_ratio_fast_path_accurate(kind):
    """|mean|/std just under the 32σ switch to the exact moments: the fast path must still be accurate."""
    q, k, v = qkv(1, 2, 64, 8, shift=30.0)
    expected = explicit_attention(q, k, v, kind)
    out = public(kind, q.float(), k.float(), v.float()).double()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
@pytest.mark.parametrize("shifted", ["qkv", "v"])
def test_large_means_gradients_accurate_in_float32(kind, shifted):
    """Large means everywhere, or in V alone (in seqnorm, V's conditioning decides the branch)."""
    q, k, v = qkv(1, 2, 40, 4)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if name in shifted:
            t.add_(1000.0)
        t.requires_grad_(True)
    out_weight = torch.randn(1, 2, 40, 4, dtype=torch.float64)
    (explicit_attention(q, k, v, kind) * out_weight).sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    (public(kind, q32, k32, v32) * out_weight.float()).sum().backward()
    for mine, ref in ((q32, q), (k32, k), (v32, v)):
        rel = (mine.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert rel < 1e-3, f"relative gradient error {rel:.2e}"


# -------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_bfloat16_on_cpu(variant):
    q, k, v = qkv(2, 2, 32, 8, dtype=torch.float32)
    weight, bias = random_affine(variant, 2, 8, dtype=torch.float32)
    expected = public(variant, q, k, v, weight, bias)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = public(variant, q.bfloat16(), k.bfloat16(), v.bfloat16(), weight, bias)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # relative to the output's own scale (SimA's outputs are of order 1/N)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_float32_inputs_keep_float32(variant):
    q, k, v = qkv(1, 2, 16, 4, dtype=torch.float32)
    weight, bias = random_affine(variant, 2, 4, dtype=torch.float32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = public(variant, q, k, v, weight, bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, public(variant, q, k, v, weight, bias))


@pytest.mark.parametrize(
    "kind,affine", [("seqnorm", False), ("seqnorm", True), ("seqnorm_qk", False), ("sima", False)]
)
def test_autocast_module_bfloat16(kind, affine):
    torch.manual_seed(0)
    attn = build_attention(kind, dim=16, num_heads=2, affine=affine)
    if affine:
        with torch.no_grad():
            attn.norm_weight.normal_(1.0, 0.3)
            attn.norm_bias.normal_(0.0, 0.3)
    x = torch.randn(2, 20, 16, requires_grad=True)
    expected = attn(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2 * scale)
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    assert torch.isfinite(x.grad).all()


# -------------------------------------------------------------------------------------- registry


KINDS = ["seqnorm", "seqnorm_qk", "sima", "softmax"]


def test_registry_names():
    assert set(KINDS) <= set(ATTENTION)
    assert [k for k in KINDS if supports_affine(k)] == ["seqnorm", "seqnorm_qk"]


@pytest.mark.parametrize(
    "kind,affine", [(k, False) for k in KINDS] + [("seqnorm", True), ("seqnorm_qk", True)]
)
@pytest.mark.parametrize("b,n,c,heads", [(1, 1, 8, 1), (2, 27, 24, 3), (3, 10, 16, 4)])
def test_modules_map_bnc_to_bnc(kind, affine, b, n, c, heads):
    attn = build_attention(kind, dim=c, num_heads=heads, affine=affine)
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


@pytest.mark.parametrize("kind", ["softmax", "sima"])
def test_affine_only_for_sequence_normalized_kinds(kind):
    with pytest.raises(ValueError, match="affine"):
        build_attention(kind, dim=16, num_heads=2, affine=True)


@pytest.mark.parametrize("dim,heads", [(10, 3), (16, 0), (0, 2)])
def test_build_attention_bad_dims(dim, heads):
    with pytest.raises(ValueError, match="num_heads"):
        build_attention("seqnorm", dim=dim, num_heads=heads)


def test_qkv_bias_flag():
    assert build_attention("softmax", dim=8, num_heads=2, qkv_bias=False).qkv.bias is None
    assert build_attention("softmax", dim=8, num_heads=2).qkv.bias is not None


@pytest.mark.parametrize("kind,scales,shifts", [("seqnorm", 3, 1), ("seqnorm_qk", 2, 2)])
def test_affine_parameters(kind, scales, shifts):
    """Flat (one block of C per normalized input, so no weight decay); at the start the scales of Q̂
    and K̂ are 1, those of V̂ `V_SCALE_INIT`, the shifts 0, so the branch is the plain one with its
    attention output scaled by V_SCALE_INIT; absent without the option: the plain module keeps the
    parameter layout of earlier versions."""
    attn = build_attention(kind, dim=16, num_heads=2, affine=True)
    assert attn.norm_weight.shape == (scales * 16,) and attn.norm_bias.shape == (shifts * 16,)
    v_scale = [V_SCALE_INIT] * 16 if kind == "seqnorm" else []
    assert torch.equal(attn.norm_weight, torch.tensor([1.0] * 32 + v_scale))
    assert torch.equal(attn.norm_bias, torch.zeros(shifts * 16))
    plain = build_attention(kind, dim=16, num_heads=2)
    assert set(plain.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    plain.load_state_dict(attn.state_dict(), strict=False)
    q, k, v = torch.randn(3, 2, 2, 9, 8).unbind(0)  # (B, H, N, d) each
    scale = V_SCALE_INIT if kind == "seqnorm" else 1.0
    torch.testing.assert_close(attn.attend(q, k, v), scale * plain.attend(q, k, v))
    with torch.no_grad():
        attn.norm_weight.fill_(1.0)  # the identity affine: the plain module
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(attn(x), plain(x))


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_modules_match_hand_written(variant):
    torch.manual_seed(2)
    b, n, c, heads = 2, 13, 16, 4
    d = c // heads
    kind, affine = kind_of(variant), variant.endswith("+affine")
    attn = build_attention(kind, dim=c, num_heads=heads, affine=affine)
    weight = bias = None
    if affine:
        with torch.no_grad():
            attn.norm_weight.normal_(1.0, 0.3)
            attn.norm_bias.normal_(0.0, 0.3)
        weight = attn.norm_weight.detach().view(-1, heads, d)  # (n, H, d): blocks of C, head-major
        bias = attn.norm_bias.detach().view(-1, heads, d)
    x = torch.randn(b, n, c)
    q, k, v = attn.qkv(x).double().split(c, dim=-1)
    heads_of = lambda t: t.view(b, n, heads, d).transpose(1, 2)  # noqa: E731
    out = explicit_attention(heads_of(q), heads_of(k), heads_of(v), kind, weight, bias)
    expected = attn.proj(out.transpose(1, 2).reshape(b, n, c).float())
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,affine", [("seqnorm", True), ("seqnorm_qk", True), ("sima", False)])
def test_modules_export_with_a_dynamic_batch_and_token_count(kind, affine):
    """While exporting, the modules take their plain form (the affine folded with elementwise
    products only), which torch.export captures for any batch and token count."""
    torch.manual_seed(3)
    attn = build_attention(kind, dim=16, num_heads=2, affine=affine).eval()
    if affine:
        with torch.no_grad():
            attn.norm_weight.normal_(1.0, 0.3)
            attn.norm_bias.normal_(0.0, 0.3)
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=2)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            attn, (torch.randn(2, 30, 16),), dynamic_shapes={"x": {0: batch, 1: tokens}}
        )
    x = torch.randn(3, 17, 16)
    torch.testing.assert_close(program.module()(x), attn(x), rtol=1e-5, atol=1e-6)

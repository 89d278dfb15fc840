"""The seq-norm attention and the model stay finite at the edges users reach: one token, constant
features, raw CT intensities in the thousands, and float16/bfloat16 autocast (the CUDA paths, run here
on the CPU)."""

from __future__ import annotations

import pytest
import torch

from volumetric.layers.attention import seqnorm_attention
from volumetric.models.vit3d import VolumeTransformer


def finite_forward_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = seqnorm_attention(q, k, v)
    out.float().square().sum().backward()
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), name
    return out


def test_one_token():
    out = finite_forward_backward(*torch.randn(3, 2, 4, 1, 8))
    assert torch.equal(out, torch.zeros_like(out))  # one token: Q̂ = 0


def test_constant_features_everywhere():
    q, k, v = torch.randn(3, 1, 2, 64, 8)
    q[..., :3], k[..., 2:5] = 7.0, -2000.0
    finite_forward_backward(q, k, v)


def test_ct_intensities_in_the_thousands():
    """Raw Hounsfield units (intensity: none): air −1000, bone up to 3000."""
    q, k, v = torch.empty(3, 1, 4, 512, 16).uniform_(-1000.0, 3000.0)
    finite_forward_backward(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_sums_do_not_overflow(dtype):
    """8192 tokens around 100: a float16 sum would reach 819,200 > 65,504 (float16's max); the
    statistics are taken in float32."""
    q, k, v = (100.0 + torch.randn(3, 1, 2, 8192, 8)).to(dtype)
    with torch.autocast(device_type="cpu", dtype=dtype):
        out = finite_forward_backward(q, k, v)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["seqnorm", "softmax"])
def test_model_under_autocast(dtype, kind):
    model = VolumeTransformer(
        num_classes=3,
        patch_size=4,
        embed_dim=24,
        depth=2,
        num_heads=2,
        attention=kind,
        grad_checkpointing=True,
    )
    x = torch.randn(2, 1, 16, 12, 8) * 500.0 + 40.0  # CT-like scale
    with torch.autocast(device_type="cpu", dtype=dtype):
        logits = model(x)
    logits.float().logsumexp(1).sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_on_a_constant_volume():
    model = VolumeTransformer(num_classes=2, patch_size=4, embed_dim=24, depth=1, num_heads=2)
    logits = model(torch.zeros(1, 1, 8, 8, 8))
    assert torch.isfinite(logits).all()

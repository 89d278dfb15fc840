"""The linear attentions and the model stay finite at the edges users reach: one token, constant
features, raw CT intensities in the thousands, and float16/bfloat16 autocast (the CUDA paths, run
here on the CPU); the model builds, runs and trains with every attention kind."""

from __future__ import annotations

import pytest
import torch

from volumetric.layers.attention import ATTENTION
from volumetric.layers.attention_functional import sima_attention
from volumetric.layers.seqnorm_kernel import seqnorm_attention
from volumetric.models.vit3d import VolumeTransformer

FUNCTIONS = {
    "seqnorm": seqnorm_attention,
    "seqnorm_qk": lambda q, k, v: seqnorm_attention(q, k, v, normalize_v=False),
    "sima": sima_attention,
}
KINDS = [("seqnorm", False), ("seqnorm", True), ("seqnorm_qk", False), ("seqnorm_qk", True)]
KINDS += [("sima", False), ("softmax", False)]


def finite_forward_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "seqnorm"
) -> torch.Tensor:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = FUNCTIONS[kind](q, k, v)
    out.float().square().sum().backward()
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), name
    return out


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk"])
def test_one_token(kind):
    out = finite_forward_backward(*torch.randn(3, 2, 4, 1, 8), kind=kind)
    assert torch.equal(out, torch.zeros_like(out))  # one token: Q̂ = 0


def test_one_token_sima():
    q, k, v = torch.randn(3, 2, 4, 1, 8)
    out = finite_forward_backward(q, k, v, kind="sima")
    # one token: Q̃ = sign(Q), K̃ = sign(K), so out = (Σ_j sign(q_j) sign(k_j)) v
    torch.testing.assert_close(out, (torch.sign(q) * torch.sign(k)).sum(-1, keepdim=True) * v)


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_constant_features_everywhere(kind):
    q, k, v = torch.randn(3, 1, 2, 64, 8)
    q[..., :3], k[..., 2:5], v[..., 4:] = 7.0, -2000.0, 0.1
    finite_forward_backward(q, k, v, kind=kind)


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_zero_features(kind):
    """A feature that is 0 on every token: std 0 (seq-norm), L1 norm 0 (SimA)."""
    q, k, v = torch.randn(3, 1, 2, 32, 8)
    q[..., 0], k[..., 1], v[..., 2] = 0.0, 0.0, 0.0
    finite_forward_backward(q, k, v, kind=kind)


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_ct_intensities_in_the_thousands(kind):
    """Raw Hounsfield units (intensity: none): air −1000, bone up to 3000."""
    q, k, v = torch.empty(3, 1, 4, 512, 16).uniform_(-1000.0, 3000.0)
    finite_forward_backward(q, k, v, kind=kind)


@pytest.mark.parametrize("kind", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_sums_do_not_overflow(dtype, kind):
    """8192 tokens around 100: a float16 sum would reach 819,200 > 65,504 (float16's max); the
    statistics and norms are taken in float32."""
    q, k, v = (100.0 + torch.randn(3, 1, 2, 8192, 8)).to(dtype)
    with torch.autocast(device_type="cpu", dtype=dtype):
        out = finite_forward_backward(q, k, v, kind=kind)
    assert out.dtype == dtype


def tiny_model(kind: str, affine: bool, **kwargs) -> VolumeTransformer:
    options = dict(num_classes=3, patch_size=4, embed_dim=24, num_heads=2, attention=kind)
    return VolumeTransformer(**options, seqnorm_affine=affine, **{"depth": 2, **kwargs})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,affine", KINDS)
def test_model_under_autocast(dtype, kind, affine):
    model = tiny_model(kind, affine, grad_checkpointing=True)
    x = torch.randn(2, 1, 16, 12, 8) * 500.0 + 40.0  # CT-like scale
    with torch.autocast(device_type="cpu", dtype=dtype):
        logits = model(x)
    logits.float().logsumexp(1).sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_every_kind_is_tested():
    assert {kind for kind, _ in KINDS} == set(ATTENTION)


@pytest.mark.parametrize("kind,affine", KINDS)
def test_model_builds_runs_and_every_parameter_learns(kind, affine):
    """Each attention kind (and the affine): forward, backward, a gradient for every parameter,
    and the same outputs and gradients with gradient checkpointing."""
    torch.manual_seed(0)
    model = tiny_model(kind, affine)
    if affine:  # away from the identity start, so that every part of the fold is exercised
        with torch.no_grad():
            for block in model.blocks:
                block.attn.norm_weight.normal_(1.0, 0.2)
                block.attn.norm_bias.normal_(0.0, 0.2)
    checkpointed = tiny_model(kind, affine, grad_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 12, 8)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    again = checkpointed(x)
    torch.testing.assert_close(again, logits)
    again.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["seqnorm_qk", "seqnorm"])
def test_affine_start_is_the_plain_model(kind):
    """With its identity start (seqnorm_qk), or its V-scales set to 1 (seqnorm, whose start is
    V_SCALE_INIT), the affine model computes what the plain one does."""
    torch.manual_seed(1)
    plain = tiny_model(kind, False)
    affine = tiny_model(kind, True)
    missing, unexpected = affine.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("norm_weight" in m or "norm_bias" in m for m in missing)
    x = torch.randn(2, 1, 8, 8, 8)
    if kind == "seqnorm":
        assert not torch.allclose(affine(x), plain(x))  # the smaller V-scales change the start
        with torch.no_grad():
            for block in affine.blocks:
                block.attn.norm_weight.fill_(1.0)
    torch.testing.assert_close(affine(x), plain(x))


@pytest.mark.parametrize("kind", ["softmax", "sima"])
def test_affine_needs_a_sequence_normalized_attention(kind):
    with pytest.raises(ValueError, match="seqnorm_affine"):
        tiny_model(kind, True)
    with pytest.raises(ValueError, match="seqnorm_affine"):
        tiny_model("seqnorm", 1)  # not a bool


@pytest.mark.parametrize("kind", ["seqnorm", "seqnorm_qk", "sima"])
def test_model_on_a_constant_volume(kind):
    model = VolumeTransformer(
        num_classes=2, patch_size=4, embed_dim=24, depth=1, num_heads=2, attention=kind
    )
    logits = model(torch.zeros(1, 1, 8, 8, 8))
    assert torch.isfinite(logits).all()


def test_config_options_reach_the_model():
    """model.attention and model.seqnorm_affine go from a config to the checkpoint's model
    arguments and the built model; a bad combination is a config error naming the key."""
    from dataclasses import asdict

    from volumetric.config import load_config
    from volumetric.errors import VolumetricError
    from volumetric.models.registry import build_model, model_arguments

    default = load_config(None, [])  # null: the attention kind's default form, off for the affine
    assert default.model.seqnorm_affine is False and default.model.attention_norm is True
    overrides = ["--model.attention=seqnorm_qk", "--model.seqnorm_affine=true"]
    overrides += ["--model.embed_dim=24", "--model.num_heads=2", "--model.depth=1"]
    config = load_config(None, overrides)
    args = model_arguments("vit3d", asdict(config.model), num_classes=2)
    assert args["attention"] == "seqnorm_qk" and args["seqnorm_affine"] is True
    model = build_model("vit3d", args)
    assert model.blocks[0].attn.norm_weight.shape == (2 * 24,)
    for bad in (["--model.attention=sima"], ["--model.attention=softmax"]):
        with pytest.raises(VolumetricError, match="model.seqnorm_affine"):
            load_config(None, [*bad, "--model.seqnorm_affine=true"])
    load_config(None, ["--model.attention=sima"])  # accepted on its own

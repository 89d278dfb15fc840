"""VolumeTransformer: shapes, gradients, checkpointing, seeding, argument checks, any-size inputs."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from volumetric.models.registry import model_arguments
from volumetric.models.vit3d import VolumeTransformer


def tiny(**kwargs) -> VolumeTransformer:
    args = dict(num_classes=2, patch_size=4, embed_dim=24, depth=2, num_heads=2)
    args.update(kwargs)
    return VolumeTransformer(**args)


@pytest.mark.parametrize(
    "patch,volume",
    [
        (4, (8, 8, 8)),
        (4, (16, 12, 8)),
        ((2, 4, 8), (8, 8, 8)),
        ((4, 2, 2), (12, 6, 4)),
        ([2, 2, 4], (4, 2, 8)),
        (8, (8, 8, 8)),  # a single token
    ],
)
@pytest.mark.parametrize("embed_dim,heads,classes", [(12, 1, 2), (24, 3, 5)])
def test_output_shapes(patch, volume, embed_dim, heads, classes):
    model = VolumeTransformer(
        num_classes=classes, patch_size=patch, embed_dim=embed_dim, depth=1, num_heads=heads
    )
    model.eval()
    x = torch.randn(2, 1, *volume)
    with torch.no_grad():
        logits = model(x)
        tokens = model.forward_features(x)
    grid = [v // p for v, p in zip(volume, model.patch_size)]
    assert logits.shape == (2, classes)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], embed_dim)
    assert torch.isfinite(logits).all()


def test_patch_size_property_is_triple():
    assert tiny(patch_size=4).patch_size == (4, 4, 4)
    assert tiny(patch_size=[2, 4, 8]).patch_size == (2, 4, 8)


def test_in_channels():
    model = tiny(in_channels=3)
    assert model(torch.randn(1, 3, 8, 8, 8)).shape == (1, 2)
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 8, 8, 8))


def test_forward_features_and_head():
    model = tiny(num_classes=3)
    x = torch.randn(2, 1, 8, 12, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 2 * 3 * 4, 24)
    # the final LayerNorm: zero mean, unit variance per token (weights at their initial ones/zeros)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 24), atol=1e-5, rtol=0)
    logits = model.forward_head(tokens)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, model(x))
    # forward_head pools by the mean over tokens: permuting the tokens changes nothing
    torch.testing.assert_close(model.forward_head(tokens.flip(1)), logits)


@pytest.mark.parametrize("attention", ["seqnorm", "softmax"])
def test_every_parameter_gets_a_gradient(attention):
    model = tiny(attention=attention, depth=2)
    x = torch.randn(2, 1, 8, 8, 12)
    model(
        x
    ).square().sum().backward()  # not the sum of logits: the head bias gradient would be trivially 2
    missing = [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not torch.count_nonzero(p.grad)
    ]
    assert not missing, f"no gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("attention", ["seqnorm", "softmax"])
@pytest.mark.parametrize("memory_lean", [False, True])
def test_grad_checkpointing_same_outputs_and_gradients(attention, memory_lean):
    torch.manual_seed(3)
    plain = tiny(attention=attention, memory_lean=memory_lean, depth=3)
    checkpointed = tiny(
        attention=attention, memory_lean=memory_lean, depth=3, grad_checkpointing=True
    )
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 12, 8)
    out_plain, out_ckpt = plain(x), checkpointed(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    target = torch.tensor([0, 1])
    torch.nn.functional.cross_entropy(out_plain, target).backward()
    torch.nn.functional.cross_entropy(out_ckpt, target).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_grad_checkpointing_recomputes_the_conv_stem():
    """With checkpointing the conv stem's full-resolution activations are not kept for backward,
    as the blocks' are not; the gradients stay those of the plain model (tested with every
    option together below)."""
    torch.manual_seed(2)
    plain = tiny(stem="conv", patch_size=4, depth=1)
    checkpointed = tiny(stem="conv", patch_size=4, depth=1, grad_checkpointing=True)
    x = torch.randn(1, 1, 32, 32, 32)
    first_width = plain.patch_embed.convs[0].out_channels
    activation = (32 // 2) ** 3 * first_width * 4  # one float32 map after the first convolution
    # without: the first convolution's output, its norm's and GELU's are kept; with: the input
    # volume (the checkpoint's) and less than one such map
    assert saved_bytes(plain, x) > 3 * activation
    assert saved_bytes(checkpointed, x) < x.numel() * 4 + activation


def test_grad_checkpointing_inactive_without_grad():
    model = tiny(grad_checkpointing=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 8, 8, 8))
    assert out.shape == (1, 2)


def test_memory_lean_matches_plain():
    torch.manual_seed(4)
    plain = tiny()
    lean = tiny(memory_lean=True)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 8, 8)
    out_plain, out_lean = plain(x), lean(x)
    torch.testing.assert_close(out_lean, out_plain)
    out_plain.square().sum().backward()
    out_lean.square().sum().backward()
    for p, q in zip(plain.parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def train_three_steps(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(4, 1, 8, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data), labels).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_seeded_training_is_reproducible():
    first, again, other = train_three_steps(11), train_three_steps(11), train_three_steps(12)
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    differing = [k for k in first if not torch.equal(first[k], other[k])]
    assert "head.weight" in differing and "patch_embed.proj.weight" in differing


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(embed_dim=24, num_heads=5), "num_heads"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=-1), "num_classes"),
        (dict(num_classes=2.0), "num_classes"),
        (dict(depth=0), "depth"),
        (dict(embed_dim=0), "embed_dim"),
        (dict(num_heads=True), "num_heads"),
        (dict(in_channels=0), "in_channels"),
        (dict(attention="linformer"), "attention"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=(4, 4)), "patch_size"),
        (dict(patch_size=(4, -4, 4)), "patch_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(embed_dim=4, num_heads=1), "embed_dim"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kwargs)


def test_constructor_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        VolumeTransformer(2)  # type: ignore[misc]


@pytest.mark.parametrize("volume", [(9, 8, 8), (8, 8, 12 + 2), (3, 8, 8)])
def test_volume_not_a_multiple_of_patch(volume):
    model = tiny()
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 1, *volume))


def test_softmax_variant_same_shapes():
    x = torch.randn(2, 1, 8, 12, 16)
    seq, soft = tiny(attention="seqnorm", attention_norm=False), tiny(attention="softmax")
    assert soft(x).shape == seq(x).shape == (2, 2)
    assert soft.forward_features(x).shape == seq.forward_features(x).shape == (2, 24, 24)
    # same parameter layout: the attention kind changes no weights (the form options aside)
    assert [(n, p.shape) for n, p in seq.named_parameters()] == [
        (n, p.shape) for n, p in soft.named_parameters()
    ]


@pytest.mark.parametrize("attention", ["seqnorm", "softmax"])
def test_trained_on_one_size_runs_on_another(attention):
    torch.manual_seed(5)
    model = tiny(attention=attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 8, 8, 8)
    before = model.head.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        optimizer.step()
    assert not torch.equal(before, model.head.weight)
    model.eval()
    with torch.no_grad():
        for volume in [(16, 12, 20), (4, 4, 4), (24, 8, 4)]:
            out = model(torch.randn(1, 1, *volume))
            assert out.shape == (1, 2)
            assert torch.isfinite(out).all()


def test_position_embedding_breaks_permutation_symmetry():
    """Without a position embedding a mean-pooled transformer is invariant to moving patches around;
    with it, swapping two patches changes the logits."""
    model = tiny(num_classes=3).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    swapped = torch.cat([x[..., 4:, :, :], x[..., :4, :, :]], dim=2)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(swapped))


def test_batch_elements_are_independent():
    model = tiny().eval()
    x = torch.randn(3, 1, 8, 8, 8)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ pooling


def test_max_pool_head():
    model = tiny(pool="max", num_classes=3)
    x = torch.randn(2, 1, 8, 12, 8)
    tokens = model.forward_features(x)
    logits = model.forward_head(tokens)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, model.head(tokens.amax(dim=1)))
    torch.testing.assert_close(model(x), logits)
    mean_model = tiny(num_classes=3)
    mean_model.load_state_dict(model.state_dict())  # same weights, another pooling
    assert not torch.allclose(mean_model.forward_head(tokens), logits)


def test_max_pool_every_parameter_gets_a_gradient():
    model = tiny(pool="max")
    model(torch.randn(2, 1, 8, 8, 12)).square().sum().backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not torch.count_nonzero(p.grad)
    ]
    assert not missing, f"no gradient: {missing}"


def test_bad_pool_raises():
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="attention")


# ---------------------------------------------------------- LayerScale, stochastic depth, norms

ALL_OPTIONS = dict(
    seqnorm_affine=True, layer_scale=0.1, attention_norm=True, stem="conv", drop_path=0.2
)


@pytest.mark.parametrize("value", [0.1, 1e-5])
def test_layer_scale_starts_at_its_value_on_both_branches(value):
    model = tiny(layer_scale=value, depth=3)
    gammas = [
        m.gamma for block in model.blocks for m in (block.ls1, block.ls2)
    ]  # (C,) each, two per block
    assert len(gammas) == 6
    for gamma in gammas:
        assert gamma.shape == (24,) and torch.equal(gamma, torch.full((24,), value))


def test_layer_scale_scales_what_each_branch_adds():
    """A block with LayerScale γ adds γ × what the same block adds without it."""
    torch.manual_seed(5)
    plain = tiny(depth=1)
    scaled = tiny(depth=1, layer_scale=0.25)
    scaled.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 40, 24)
    block_p, block_s = plain.blocks[0], scaled.blocks[0]
    with torch.no_grad():
        attn_p = block_p.attn(block_p.norm1(x))
        attn_s = block_s.ls1(block_s.attn(block_s.norm1(x)))
    torch.testing.assert_close(attn_s, 0.25 * attn_p)


def test_layer_scale_off_adds_no_weights():
    names = {n for n, _ in tiny(attention_norm=False).named_parameters()}
    assert not any(".ls" in n or "out_norm" in n for n in names)
    with_all = {n for n, _ in tiny(layer_scale=0.1, attention_norm=True).named_parameters()}
    assert {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.0.attn.out_norm.weight"} <= with_all


def test_drop_path_is_inactive_in_eval_and_active_in_training():
    torch.manual_seed(6)
    dropping = tiny(drop_path=0.5, depth=3)
    plain = tiny(depth=3)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(8, 1, 8, 8, 8)
    dropping.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping(x), plain(x), rtol=0, atol=0)
        dropping.train(), plain.train()
        assert not torch.allclose(dropping(x), plain(x))
    # the rate grows linearly with depth: none in the first block, the full rate in the last
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in dropping.blocks]
    assert rates == [0.0, 0.25, 0.5]


def test_every_option_together_trains_and_checkpoints_the_same():
    """All options on: every parameter gets a gradient, and gradient checkpointing (eval-mode
    drop path, so both passes are the same function) changes neither outputs nor gradients."""
    torch.manual_seed(7)
    plain = tiny(**ALL_OPTIONS, depth=2, patch_size=4).eval()
    checkpointed = tiny(**ALL_OPTIONS, depth=2, patch_size=4, grad_checkpointing=True).eval()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 12, 8)
    out_plain, out_ckpt = plain(x), checkpointed(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None and torch.count_nonzero(p.grad), name
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_options_draw_nothing_from_the_rng_but_the_conv_stem():
    """LayerScale, the attention norm and drop path draw no random numbers at construction: a
    seed gives the same shared weights with them as without (the conv stem draws its kernels)."""
    torch.manual_seed(8)
    plain = tiny()
    torch.manual_seed(8)
    options = tiny(layer_scale=0.1, attention_norm=True, drop_path=0.1)
    shared = options.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(shared[name], value), name


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(layer_scale=0), "layer_scale"),
        (dict(layer_scale=-0.1), "layer_scale"),
        (dict(layer_scale=True), "layer_scale"),
        (dict(drop_path=1.0), "drop_path"),
        (dict(drop_path=-0.1), "drop_path"),
        (dict(stem="hybrid"), "stem"),
        (dict(stem="conv", patch_size=6), "stem"),
        (dict(stem="conv", patch_size=(4, 4, 3)), "stem"),
        (dict(attention_norm="yes"), "attention_norm"),
    ],
)
def test_bad_option_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kwargs)


@pytest.mark.parametrize(
    "attention,options,expected",
    [
        ("seqnorm", {}, {"seqnorm_affine": False, "attention_norm": True}),
        ("seqnorm", {"attention_norm": False}, {"seqnorm_affine": False, "attention_norm": False}),
        ("seqnorm", {"seqnorm_affine": True}, {"seqnorm_affine": True, "attention_norm": True}),
        ("seqnorm_qk", {}, {"seqnorm_affine": False, "attention_norm": False}),
        ("softmax", {}, {"seqnorm_affine": False, "attention_norm": False}),
        ("softmax", {"attention_norm": True}, {"seqnorm_affine": False, "attention_norm": True}),
        ("sima", {}, {"seqnorm_affine": False, "attention_norm": False}),
    ],
)
def test_default_form_depends_on_the_attention_kind(attention, options, expected):
    """None ("the kind's default") gives seqnorm the attention-output LayerNorm and leaves the
    reference kinds as published; an explicit value always wins."""
    model = tiny(attention=attention, **options)
    block = model.blocks[0]
    assert isinstance(block.attn.out_norm, torch.nn.LayerNorm) == expected["attention_norm"]
    affine = getattr(block.attn, "norm_weight", None) is not None
    assert affine == expected["seqnorm_affine"]
    arguments = model_arguments("vit3d", {"attention": attention, **options}, 2)
    assert {k: arguments[k] for k in expected} == expected  # what a checkpoint records


@pytest.mark.parametrize("attention,expected", [("seqnorm", True), ("softmax", False)])
def test_null_form_option_in_a_config_is_written_out(attention, expected):
    """A config's null form option becomes the kind's value when the config is validated, so
    the config a run saves (config.yaml, the checkpoint) says what was built."""
    from volumetric.config import config_from_dict

    config = config_from_dict({"model": {"attention": attention, "attention_norm": None}})
    assert config.model.attention_norm is expected and config.model.seqnorm_affine is False
    assert model_arguments("vit3d", asdict(config.model), 3)["attention_norm"] is expected

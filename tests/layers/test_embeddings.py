"""PatchEmbed3d (volume → tokens and grid) and the 3D sin-cos position embedding."""

from __future__ import annotations

import pytest
import torch

from volumetric.layers.patch_embed import (
    STEM_NORMS,
    ConvStem3d,
    PatchEmbed3d,
    as_triple,
    build_stem,
)
from volumetric.layers.pos_embed import sincos_pos_embed_3d


@pytest.mark.parametrize(
    "patch,volume,grid",
    [
        (4, (8, 12, 16), (2, 3, 4)),
        ((2, 4, 8), (8, 8, 8), (4, 2, 1)),
        ([4, 2, 2], (4, 6, 2), (1, 3, 1)),
        (1, (3, 2, 1), (3, 2, 1)),
    ],
)
@pytest.mark.parametrize("batch,in_ch,dim", [(1, 1, 12), (3, 2, 8)])
def test_patch_embed_shape_and_grid(patch, volume, grid, batch, in_ch, dim):
    embed = PatchEmbed3d(patch_size=patch, in_channels=in_ch, embed_dim=dim)
    tokens, out_grid = embed(torch.randn(batch, in_ch, *volume))
    assert out_grid == grid
    n = grid[0] * grid[1] * grid[2]
    assert tokens.shape == (batch, n, dim)
    assert embed.grid(volume) == grid


def test_patch_embed_token_order_is_row_major_whd():
    """Token i of the sequence is the patch at (w, h, d) in row-major order, matching sincos_pos_embed_3d."""
    embed = PatchEmbed3d(patch_size=2, in_channels=1, embed_dim=1)
    with torch.no_grad():
        embed.proj.weight.fill_(1.0)  # sum of the 8 voxels of the patch
        embed.proj.bias.zero_()
    volume = torch.zeros(1, 1, 4, 6, 8)
    volume[0, 0, 2:4, 0:2, 6:8] = 1.0  # patch (w=1, h=0, d=3)
    tokens, grid = embed(volume)
    assert grid == (2, 3, 4)
    expected = 1 * (3 * 4) + 0 * 4 + 3
    assert tokens[0, :, 0].argmax().item() == expected
    assert tokens[0, expected, 0].item() == pytest.approx(8.0)


def test_patch_embed_each_token_sees_only_its_patch():
    embed = PatchEmbed3d(patch_size=(2, 2, 2), in_channels=1, embed_dim=4)
    x = torch.randn(1, 1, 4, 4, 4)
    base, _ = embed(x)
    y = x.clone()
    y[0, 0, 0, 0, 0] += 10.0  # inside patch 0 only
    changed, _ = embed(y)
    diff = (changed - base).abs().sum(dim=-1)[0]  # (N,)
    assert diff[0] > 0
    assert torch.all(diff[1:] == 0)


@pytest.mark.parametrize("volume", [(9, 8, 8), (8, 8, 7), (8, 3, 8)])
def test_patch_embed_not_a_multiple_raises(volume):
    embed = PatchEmbed3d(patch_size=4, in_channels=1, embed_dim=8)
    with pytest.raises(ValueError, match="patch_size"):
        embed(torch.randn(1, 1, *volume))
    with pytest.raises(ValueError, match="multiple"):
        embed.grid(volume)


def test_patch_embed_wrong_input_rank_or_channels_raises():
    embed = PatchEmbed3d(patch_size=2, in_channels=1, embed_dim=8)
    with pytest.raises(ValueError):
        embed(torch.randn(1, 4, 4, 4))  # no channel axis
    with pytest.raises(ValueError):
        embed(torch.randn(1, 2, 4, 4, 4))  # two channels for a one-channel embedding


@pytest.mark.parametrize("bad", [0, -2, (2, 2), (2, 2, 2, 2), (2, 0, 2), (2.0, 2, 2), "4"])
def test_bad_patch_size_raises(bad):
    with pytest.raises(ValueError, match="patch_size"):
        PatchEmbed3d(patch_size=bad, in_channels=1, embed_dim=8)


def test_as_triple():
    assert as_triple(3, "x") == (3, 3, 3)
    assert as_triple([1, 2, 3], "x") == (1, 2, 3)
    with pytest.raises(ValueError, match="my_arg"):
        as_triple((1, 2), "my_arg")


# ------------------------------------------------------------------------------------ position embedding


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 4), (5, 1, 2), (4, 4, 4)])
@pytest.mark.parametrize("dim", [6, 12, 24, 64, 100])
def test_sincos_shape_and_finite(grid, dim):
    embed = sincos_pos_embed_3d(grid, dim)
    n = grid[0] * grid[1] * grid[2]
    assert embed.shape == (n, dim)
    assert embed.dtype == torch.float32
    assert torch.isfinite(embed).all()
    assert embed.abs().max() <= 1.0


@pytest.mark.parametrize(
    "grid,dim", [((2, 3, 4), 12), ((4, 4, 4), 24), ((3, 5, 2), 7), ((6, 6, 6), 6)]
)
def test_sincos_distinct_rows(grid, dim):
    embed = sincos_pos_embed_3d(grid, dim)
    distances = torch.cdist(embed.double(), embed.double())
    off_diagonal = distances + torch.eye(len(embed), dtype=torch.float64) * 1e9
    assert off_diagonal.min() > 1e-3


def test_sincos_rows_follow_row_major_grid():
    """Row index w·(h·d) + h·d + d encodes (w, h, d): the first axis' channels depend only on w, etc."""
    grid, dim = (2, 3, 4), 24
    embed = sincos_pos_embed_3d(grid, dim).view(*grid, dim)
    per_axis = 2 * (dim // 6)
    w_part, h_part, d_part = (
        embed[..., :per_axis],
        embed[..., per_axis : 2 * per_axis],
        embed[..., 2 * per_axis :],
    )
    assert torch.equal(w_part, w_part[:, :1, :1].expand_as(w_part))
    assert torch.equal(h_part, h_part[:1, :, :1].expand_as(h_part))
    assert torch.equal(d_part, d_part[:1, :1, :].expand_as(d_part))
    # position 0 on every axis: sin 0 = 0, cos 0 = 1
    f = dim // 6
    torch.testing.assert_close(embed[0, 0, 0, :f], torch.zeros(f))
    torch.testing.assert_close(embed[0, 0, 0, f : 2 * f], torch.ones(f))


def test_sincos_same_position_same_row_across_grids():
    """Computed from the grid: a position's row does not depend on the grid's extent."""
    small = sincos_pos_embed_3d((2, 2, 2), 12).view(2, 2, 2, 12)
    large = sincos_pos_embed_3d((5, 4, 3), 12).view(5, 4, 3, 12)
    torch.testing.assert_close(small, large[:2, :2, :2])


@pytest.mark.parametrize("dim", [0, 1, 5])
def test_sincos_dim_below_six_raises(dim):
    with pytest.raises(ValueError, match="6"):
        sincos_pos_embed_3d((2, 2, 2), dim)


@pytest.mark.parametrize("dim", [7, 8, 11, 13, 17])
def test_sincos_leftover_channels_zero(dim):
    embed = sincos_pos_embed_3d((3, 2, 2), dim)
    used = 6 * (dim // 6)
    assert embed.shape[1] == dim
    assert torch.equal(embed[:, used:], torch.zeros(embed.shape[0], dim - used))
    assert embed[:, :used].abs().sum() > 0


# ------------------------------------------------------------------------------- the conv stem


@pytest.mark.parametrize(
    "patch,volume",
    [
        (8, (16, 24, 8)),
        (4, (8, 12, 16)),
        ((2, 4, 8), (8, 8, 16)),
        ([8, 4, 1], (16, 8, 3)),
        (1, (3, 2, 1)),
    ],
)
@pytest.mark.parametrize("batch,in_ch,dim", [(1, 1, 12), (2, 2, 32)])
def test_conv_stem_reaches_the_patch_stems_grid(patch, volume, batch, in_ch, dim):
    """Same tokens shape and grid as the patch stem, for cubic, anisotropic and unit patches."""
    x = torch.randn(batch, in_ch, *volume)
    options = dict(patch_size=patch, in_channels=in_ch, embed_dim=dim)
    patch_tokens, patch_grid = PatchEmbed3d(**options)(x)
    conv = ConvStem3d(**options)
    conv_tokens, conv_grid = conv(x)
    assert conv_grid == patch_grid == conv.grid(volume)
    assert conv_tokens.shape == patch_tokens.shape
    halvings = max(p.bit_length() - 1 for p in as_triple(patch, "patch"))
    assert sum(isinstance(m, torch.nn.Conv3d) for m in conv.convs) == halvings


def test_conv_stem_token_order_matches_the_grid():
    """A bright voxel in one patch moves the token of that patch most (row-major w, h, d)."""
    torch.manual_seed(0)
    stem = ConvStem3d(patch_size=4, in_channels=1, embed_dim=16).eval()
    base = torch.zeros(1, 1, 8, 12, 16)
    bright = base.clone()
    bright[0, 0, 5, 9, 13] = 50.0  # patch (1, 2, 3) of the (2, 3, 4) grid: token (1·3 + 2)·4 + 3
    with torch.no_grad():
        change = (stem(bright)[0] - stem(base)[0]).norm(dim=-1)  # (N,)
    assert int(change.argmax()) == (1 * 3 + 2) * 4 + 3


@pytest.mark.parametrize("norm", STEM_NORMS)
def test_conv_stem_is_independent_of_the_batch(norm):
    """No BatchNorm: a scan's tokens do not depend on its batch mates, in training mode too."""
    torch.manual_seed(1)
    stem = ConvStem3d(patch_size=4, in_channels=1, embed_dim=16, norm=norm).train()
    x = torch.randn(3, 1, 16, 16, 16)
    torch.testing.assert_close(stem(x[:1])[0][0], stem(x)[0][0])


def test_the_channel_norm_stem_sees_its_receptive_field_only():
    """Per-voxel LayerNorm: a token does not depend on voxels beyond its receptive field."""
    torch.manual_seed(1)
    stem = ConvStem3d(patch_size=4, in_channels=1, embed_dim=16, norm="channel")
    x = torch.randn(1, 1, 16, 16, 16)
    far = x.clone()
    far[..., 12:, 12:, 12:] += 10.0  # far corner: tokens of the first patch cannot see it
    torch.testing.assert_close(stem(far)[0][0, 0], stem(x)[0][0, 0])


def test_the_instance_norm_stem_keeps_the_contrast_the_channel_norm_stem_loses():
    """Faint noise everywhere and one bright block: after the first convolution and its norm,
    the instance norm keeps the block's features several times larger than the noise's, while
    the per-voxel channel norm makes every voxel's features the same size (the mechanism behind
    the stem_norm default, docs/method.md#the-model)."""
    torch.manual_seed(2)
    x = 0.05 * torch.randn(1, 1, 16, 16, 16)
    x[..., 4:10, 4:10, 4:10] += 3.0 + 0.05 * torch.randn(6, 6, 6)
    block = torch.zeros(8, 8, 8, dtype=torch.bool)  # the first convolution halves the grid
    block[2:5, 2:5, 2:5] = True
    ratios = {}
    for norm in STEM_NORMS:
        stem = ConvStem3d(patch_size=4, in_channels=1, embed_dim=16, norm=norm)
        with torch.no_grad():
            size = stem.convs[1](stem.convs[0](x))[0].norm(dim=0)  # (8, 8, 8) per voxel
        ratios[norm] = float(size[block].mean() / size[~block].mean())
    assert ratios["instance"] > 5.0
    assert ratios["channel"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("patch", [6, (8, 8, 3), 12])
def test_conv_stem_needs_powers_of_two(patch):
    with pytest.raises(ValueError, match="power of two"):
        ConvStem3d(patch_size=patch, in_channels=1, embed_dim=16)


def test_unknown_stem():
    with pytest.raises(ValueError, match="stem='hybrid'"):
        build_stem("hybrid", patch_size=4, in_channels=1, embed_dim=16)


def test_unknown_stem_norm():
    with pytest.raises(ValueError, match="stem_norm='batch'"):
        build_stem("conv", patch_size=4, in_channels=1, embed_dim=16, norm="batch")

"""Masked-volume modeling (volumetric/models/mae.py): masks, patches, what the encoder sees, the
loss, and the reconstruction."""

from __future__ import annotations

import pytest
import torch

from volumetric.models.mae import (
    MaskedVolumeModel,
    hide,
    normalized_patches,
    patchify,
    token_mask,
    unpatchify,
)
from volumetric.models.vit3d import VolumeTransformer

PATCH = (4, 4, 2)
VOLUME = (2, 1, 16, 12, 8)  # grid (4, 3, 4): 48 tokens


def model(stem: str = "patch", attention: str = "seqnorm") -> MaskedVolumeModel:
    torch.manual_seed(0)
    encoder = VolumeTransformer(
        num_classes=2,
        patch_size=PATCH,
        embed_dim=24,
        depth=2,
        num_heads=2,
        stem="conv" if stem == "conv" else "patch",
        attention=attention,
    )
    return MaskedVolumeModel(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def masks(n: int = 2, ratio: float = 0.75, epoch: int = 0) -> torch.Tensor:
    return torch.stack([token_mask(3, epoch, f"scan{i}", 48, ratio) for i in range(n)])


def test_token_mask_is_a_pure_function_of_seed_epoch_and_scan():
    first = token_mask(3, 5, "a/scan.nii.gz", 48, 0.75)
    assert torch.equal(first, token_mask(3, 5, "a/scan.nii.gz", 48, 0.75))
    assert int(first.sum()) == 36  # round(0.75 · 48) hidden
    others = [
        token_mask(4, 5, "a/scan.nii.gz", 48, 0.75),
        token_mask(3, 6, "a/scan.nii.gz", 48, 0.75),
        token_mask(3, 5, "b/scan.nii.gz", 48, 0.75),
    ]
    assert all(not torch.equal(first, other) for other in others)
    # whatever the ratio, one token stays visible and one is hidden
    assert int(token_mask(0, 0, "x", 4, 0.99).sum()) == 3
    assert int(token_mask(0, 0, "x", 4, 0.01).sum()) == 1


def test_patchify_follows_the_token_grid_and_unpatchify_inverts_it():
    volume = torch.randn(*VOLUME)
    tokens = patchify(volume, PATCH)  # (2, 48, 32)
    assert tokens.shape == (2, 48, 32)
    assert torch.equal(unpatchify(tokens, (4, 3, 4), PATCH), volume)
    # token (i·3 + j)·4 + k holds the voxels of patch (i, j, k), like the patch embedding
    i, j, k = 2, 1, 3
    cube = volume[:, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, 2 * k : 2 * k + 2]
    assert torch.equal(tokens[:, (i * 3 + j) * 4 + k], cube.reshape(2, -1))


def test_hide_blanks_exactly_the_hidden_patches():
    volume = torch.randn(*VOLUME) + 5.0
    mask = masks()
    hidden = patchify(hide(volume, mask, PATCH), PATCH)  # (2, 48, 32)
    assert torch.all(hidden[mask] == 0)
    assert torch.equal(hidden[~mask], patchify(volume, PATCH)[~mask])


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("attention", ["seqnorm", "softmax"])
def test_the_encoder_never_sees_a_hidden_patch(stem, attention):
    """Changing every hidden voxel leaves the encoder's output unchanged, bit for bit; changing
    one visible voxel does not (the test can tell)."""
    mae = model(stem, attention).eval()
    volume, mask = torch.randn(*VOLUME), masks()
    visible = hide(torch.ones(*VOLUME), mask, PATCH)  # 1 on visible voxels, 0 on hidden ones
    changed = volume + 100.0 * torch.randn(*VOLUME) * (1 - visible)
    with torch.no_grad():
        encoded, keep = mae.encode(volume, mask)
        again, keep_again = mae.encode(changed, mask)
        assert encoded.shape == (2, 12, 24) and torch.equal(keep, keep_again)
        assert torch.equal(encoded, again)
        touched = volume.clone()
        spot = torch.nonzero(visible[0, 0])[0]
        touched[0, 0, spot[0], spot[1], spot[2]] += 10.0
        assert not torch.equal(mae.encode(touched, mask)[0], encoded)


def test_the_loss_counts_the_hidden_patches_only():
    """With a decoder that predicts the target exactly on hidden patches and garbage elsewhere the
    loss is 0; garbage on one hidden patch gives its mean square over the hidden patches."""
    mae = model()
    volume, mask = torch.randn(*VOLUME), masks()
    target = normalized_patches(volume, PATCH)  # (2, 48, 32)
    prediction = torch.where(mask.unsqueeze(-1), target, torch.full_like(target, 7.0))
    mae.decode = lambda *args: prediction  # type: ignore[method-assign]
    loss, _ = mae(volume, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    wrong = prediction.clone()
    first_hidden = int(torch.nonzero(mask[0])[0])
    wrong[0, first_hidden] += 2.0  # error 2 on every voxel of one hidden patch
    mae.decode = lambda *args: wrong  # type: ignore[method-assign]
    loss, _ = mae(volume, mask)
    assert loss.item() == pytest.approx(4.0 / int(mask.sum()), rel=1e-6)


def test_the_target_is_each_patch_standardized():
    volume = torch.randn(*VOLUME) * 30.0 + 200.0
    target = normalized_patches(volume, PATCH)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 48), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.std(-1, correction=0), torch.ones(2, 48), atol=1e-3, rtol=0)


def test_every_parameter_but_the_removed_head_learns():
    mae = model("conv")
    volume, mask = torch.randn(*VOLUME), masks()
    loss, prediction = mae(volume, mask)
    assert prediction.shape == (2, 48, 32) and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in mae.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    assert not any(n.startswith("encoder.head") for n, _ in mae.named_parameters())


def test_reconstruction_keeps_the_visible_patches():
    mae = model().eval()
    volume, mask = torch.randn(*VOLUME), masks()
    with torch.no_grad():
        _, prediction = mae(volume, mask)
        filled = mae.reconstruction(volume, mask, prediction)
    assert filled.shape == volume.shape
    kept = hide(torch.ones(*VOLUME), mask, PATCH).bool()
    assert torch.equal(filled[kept], volume[kept])
    assert not torch.equal(filled[~kept], volume[~kept])


def test_a_batch_must_hide_as_many_tokens_in_every_scan():
    mae = model()
    mask = masks()
    mask[1, torch.nonzero(mask[1])[0]] = False
    with pytest.raises(ValueError, match="as many tokens"):
        mae(torch.randn(*VOLUME), mask)

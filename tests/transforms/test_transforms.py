"""transforms: the deterministic preprocessing pipeline, the custom intensity transforms, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import write_scan

from volumetric.errors import VolumetricError
from volumetric.transforms import (
    CTWindow,
    ForegroundZNormalization,
    build_augmentation,
    build_preprocessing,
)
from volumetric.transforms.foreground_zscore import zscore_foreground


def subject(data: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> tio.Subject:
    affine = np.diag([*spacing, 1.0])
    return tio.Subject(image=tio.ScalarImage(tensor=data.float(), affine=affine))


def settings(**kwargs):
    base = {
        "spacing": None,
        "target_shape": None,
        "intensity": "zscore",
        "ct_window": [-1000.0, 1000.0],
        "canonical": True,
    }
    base.update(kwargs)
    return base


@pytest.mark.parametrize("target", [[16, 16, 16], [8, 12, 20], [32, 8, 8]])
@pytest.mark.parametrize("spacing", [None, 1.5, [2.0, 1.0, 1.0]])
def test_preprocessing_output_shape_is_target(target, spacing):
    data = torch.rand(1, 20, 18, 14)
    out = build_preprocessing(settings(target_shape=target, spacing=spacing), 4)(
        subject(data, (1.5, 1.5, 2.0))
    )
    assert tuple(out.image.shape[1:]) == tuple(target)
    assert out.image.data.dtype == torch.float32
    assert torch.isfinite(out.image.data).all()


@pytest.mark.parametrize(
    "shape,patch,expected",
    [
        ((20, 18, 14), 4, (20, 20, 16)),
        ((16, 16, 16), 8, (16, 16, 16)),
        ((9, 5, 9), [4, 2, 8], (12, 6, 16)),
        ((4, 4, 4), 4, (4, 4, 4)),
    ],
)
def test_preprocessing_without_target_pads_to_patch_multiple(shape, patch, expected):
    out = build_preprocessing(settings(target_shape=None), patch)(subject(torch.rand(1, *shape)))
    assert tuple(out.image.shape[1:]) == expected


@pytest.mark.parametrize("target_shape", [None, [16, 16, 16]], ids=["native-grid", "target-shape"])
def test_preprocessing_refuses_a_scan_smaller_than_one_patch(target_shape):
    """Padding 3 voxels up to a patch of 4 (or to a 16³ target) would classify mostly padding."""
    with pytest.raises(VolumetricError, match=r"3×4×4 voxels .* smaller than one 4×4×4 patch"):
        build_preprocessing(settings(target_shape=target_shape), 4)(subject(torch.rand(1, 3, 4, 4)))


def test_preprocessing_resamples_to_spacing_from_file(tmp_path):
    """Read through TorchIO from a NIfTI with 1.5×1.5×2 mm voxels, resampled to 3 mm."""
    path = write_scan(
        tmp_path / "s.nii.gz",
        np.random.default_rng(0).normal(size=(20, 18, 16)),
        spacing=(1.5, 1.5, 2.0),
    )
    out = build_preprocessing(settings(spacing=3.0), 2)(tio.Subject(image=tio.ScalarImage(path)))
    assert out.image.spacing == pytest.approx((3.0, 3.0, 3.0))
    extent = (20 * 1.5 / 3, 18 * 1.5 / 3, 16 * 2.0 / 3)  # 10, 9, 10.67 voxels of 3 mm
    for size, mm in zip(out.image.shape[1:], extent):
        assert size % 2 == 0  # padded up to the patch
        assert int(mm) <= size <= int(mm) + 2


def test_preprocessing_canonical_orientation():
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS
    image = tio.ScalarImage(tensor=torch.rand(1, 4, 4, 4), affine=affine)
    out = build_preprocessing(settings(intensity="none"), 2)(tio.Subject(image=image))
    assert out.image.orientation == ("R", "A", "S")
    torch.testing.assert_close(out.image.data, image.data.flip(1))
    kept = build_preprocessing(settings(intensity="none", canonical=False), 2)(
        tio.Subject(image=image)
    )
    assert kept.image.orientation == ("L", "A", "S")


def test_preprocessing_is_deterministic():
    data = torch.rand(1, 20, 18, 14) * 100
    pipeline = build_preprocessing(settings(target_shape=[16, 16, 16], spacing=1.2), 4)
    a, b = pipeline(subject(data, (1.5, 1.5, 2.0))), pipeline(subject(data, (1.5, 1.5, 2.0)))
    assert torch.equal(a.image.data, b.image.data)


def test_preprocessing_unknown_intensity_raises():
    with pytest.raises(ValueError, match="intensity"):
        build_preprocessing(settings(intensity="hu"), 4)


# ------------------------------------------------------------------------------------------ z-score


def test_zscore_constant_volume_gives_zeros():
    for value in (0.0, 5.0, -300.0):
        data = torch.full((1, 6, 5, 4), value)
        out = ForegroundZNormalization()(subject(data)).image.data
        assert torch.isfinite(out).all()
        assert torch.equal(out, torch.zeros_like(out))


def test_zscore_constant_volume_through_pipeline_gives_zeros():
    data = torch.full((1, 10, 10, 10), 42.0)
    out = build_preprocessing(settings(target_shape=[8, 8, 8]), 4)(subject(data)).image.data
    assert torch.isfinite(out).all() and not out.abs().any()


def test_zscore_foreground_statistics():
    data = torch.zeros(1, 10, 10, 10)
    data[0, :5] = torch.linspace(50, 150, 500).view(5, 10, 10)  # foreground: above the mean
    original = data.clone()
    out = zscore_foreground(data)
    assert torch.equal(data, original)  # the input is not modified in place
    foreground = data > data.mean()
    assert out[foreground].mean().abs() < 1e-5
    assert out[foreground].std(correction=0) == pytest.approx(1.0, abs=1e-4)
    assert (out[~foreground] < -1).all()  # background is far below the foreground mean


def test_zscore_per_channel_and_two_valued():
    data = torch.stack([torch.rand(4, 4, 4) * 10, torch.full((4, 4, 4), 3.0)])
    data[1, 0] = 7.0  # a two-valued channel: foreground constant → std 0 → zeros, not NaN
    out = zscore_foreground(data)
    assert torch.isfinite(out).all()
    assert out[0][data[0] > data[0].mean()].mean().abs() < 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# ------------------------------------------------------------------------------------------ CT window


def test_ct_window_maps_and_clamps():
    values = torch.tensor([-3000.0, -1000.0, -500.0, 0.0, 400.0, 1000.0, 5000.0])
    data = values.view(1, 7, 1, 1)
    out = CTWindow(-1000, 1000)(subject(data)).image.data.flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.7, 1.0, 1.0]))


def test_ct_window_custom_window_and_pipeline():
    data = torch.tensor([-200.0, -100.0, 50.0, 200.0, 900.0]).view(1, 5, 1, 1)
    out = CTWindow(low=-100, high=200)(subject(data)).image.data.flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    ct = torch.randn(1, 8, 8, 8) * 2000
    piped = build_preprocessing(settings(intensity="ct", ct_window=[-500, 500]), 4)(
        subject(ct)
    ).image.data
    assert piped.min() >= 0.0 and piped.max() <= 1.0
    torch.testing.assert_close(piped, ((ct.clamp(-500, 500) + 500) / 1000))


@pytest.mark.parametrize("low,high", [(0, 0), (100, -100)])
def test_ct_window_bad_window_raises(low, high):
    with pytest.raises(ValueError, match="low < high"):
        CTWindow(low, high)


def test_minmax_intensity():
    data = torch.rand(1, 8, 8, 8) * 300 - 100
    out = build_preprocessing(settings(intensity="minmax"), 4)(subject(data)).image.data
    assert out.min().item() == pytest.approx(0.0) and out.max().item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ augmentation


def test_build_augmentation_empty_is_none():
    assert build_augmentation([]) is None


def test_build_augmentation_pipeline_runs():
    pipeline = build_augmentation(
        [{"RandomFlip": {"axes": [0], "flip_probability": 1.0}}, {"RandomNoise": None}]
    )
    assert isinstance(pipeline, tio.Compose) and len(pipeline) == 2
    data = torch.arange(4 * 3 * 2.0).view(1, 4, 3, 2)
    out = build_augmentation([{"RandomFlip": {"axes": [0], "flip_probability": 1.0}}])(
        subject(data)
    ).image.data
    torch.testing.assert_close(out, data.flip(1))
    noisy = pipeline(subject(data)).image.data
    assert noisy.shape == data.shape and not torch.equal(noisy, data.flip(1))


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"RandomNonsense": {}}, "RandomNonsense"),
        ({"ZNormalization": {}}, "ZNormalization"),  # a real TorchIO transform, but not random
        ({"Resample": {"target": 2}}, "Resample"),
        ({"RandomFlip": {"axis": [0]}}, "RandomFlip"),  # misspelled keyword
        ({"RandomAffine": {"scales": -5, "degrees": "a lot"}}, "RandomAffine"),
        ({"RandomNoise": {"std": -1}}, "RandomNoise"),
    ],
)
def test_build_augmentation_rejects(entry, match):
    with pytest.raises(VolumetricError, match=match):
        build_augmentation([{"RandomFlip": {}}, entry])


def test_build_augmentation_error_names_the_index():
    with pytest.raises(VolumetricError, match=r"augment\[1\]"):
        build_augmentation([{"RandomFlip": {}}, {"Crop": {"cropping": 1}}])

"""Relevance maps (`volumetric-infer --maps`): geometry, localization, montage, failures.

A tiny max-pool VolumeTransformer is trained here, in seconds, to tell 16³ noise volumes with a
bright 6³ cube from those without; its maps must then point at the cube of scans written in
other orientations and sizes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PNG_SIGNATURE, read_csv

from volumetric.checkpoint import save_checkpoint
from volumetric.cli import infer_main
from volumetric.data.dataset import preprocess_scan, read_scan
from volumetric.errors import VolumetricError
from volumetric.explain.relevance import to_input_grid, token_shares
from volumetric.explain.save import map_names, scan_name
from volumetric.inference import Predictor, predict_to_csv
from volumetric.models.registry import build_model
from volumetric.models.vit3d import VolumeTransformer
from volumetric.transforms import build_preprocessing
from volumetric.transforms.foreground_zscore import zscore_foreground

SIZE, SIDE, PATCH = 16, 6, 4  # training volumes, planted cube, patch (all in voxels)
# Q,K-only attention: these tests pin where the maps land (orientation, resampling, padding), which
# needs a model whose evidence sits in the cube's tokens. With V normalized too (the default), the
# tiny model's relevance spreads over the whole scan (the peak can land on a padded edge): measured
# in docs/results.md#relevance-maps-and-the-normalization-of-v.
MODEL_ARGS = dict(
    num_classes=2,
    patch_size=PATCH,
    embed_dim=24,
    depth=1,
    num_heads=2,
    pool="max",
    attention="seqnorm_qk",
)
NATIVE = {
    "spacing": None,
    "target_shape": None,
    "intensity": "zscore",
    "ct_window": [-1000.0, 1000.0],
    "canonical": True,
    "patch_size": PATCH,
}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def save(
    path: Path, model: VolumeTransformer, preprocessing: dict, model_args: dict = MODEL_ARGS
) -> Path:
    save_checkpoint(
        path,
        model=model,
        model_args=model_args,
        class_names=["healthy", "lesion"],
        preprocessing=preprocessing,
        config={},
    )
    return path


def synthetic_batch(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n z-scored SIZE³ noise volumes (n, 1, S, S, S), a bright SIDE³ cube at a random place in those labelled 1."""
    volumes = 100.0 + 10.0 * torch.randn(n, 1, SIZE, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    for volume, label in zip(volumes, labels):
        x, y, z = torch.randint(0, SIZE - SIDE + 1, (3,), generator=generator).tolist()
        if label:
            volume[0, x : x + SIDE, y : y + SIDE, z : z + SIDE] += 80.0
    return torch.stack(
        [zscore_foreground(v) for v in volumes]
    ), labels  # what ForegroundZNormalization does


@pytest.fixture(scope="module")
def lesion_model() -> VolumeTransformer:
    """A VolumeTransformer that has learnt the planted cube (held-out accuracy 1.0)."""
    torch.manual_seed(0)
    model = VolumeTransformer(**MODEL_ARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(70):
        volumes, labels = synthetic_batch(generator, 16)
        loss = torch.nn.functional.cross_entropy(model(volumes), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    volumes, labels = synthetic_batch(torch.Generator().manual_seed(2), 32)
    with torch.no_grad():
        accuracy = (model(volumes).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == 1.0, f"the tiny model did not learn the cube (held-out accuracy {accuracy})"
    return model


def lesion_scan(
    path: Path,
    shape: tuple[int, int, int],
    corner: tuple[int, int, int],
    affine: np.ndarray,
    seed: int,
) -> tuple[Path, tuple[slice, ...]]:
    """Noise with a bright SIDE³ cube at ``corner`` (file voxel indices); the scan and the cube's slices."""
    data = np.random.default_rng(seed).normal(100.0, 10.0, shape)
    cube = tuple(slice(c, c + SIDE) for c in corner)
    data[cube] += 80.0
    return write_nifti(path, data, affine), cube


FLIPPED_X = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -3], [0, 0, 1.0, 7], [0, 0, 0, 1]])  # LAS
PERMUTED = np.array(
    [[0, -1.0, 0, 9], [0, 0, 1.0, -4], [1.0, 0, 0, 2], [0, 0, 0, 1]]
)  # file axes → S, L, A


@pytest.fixture(scope="module")
def maps_run(lesion_model, tmp_path_factory):
    """One `volumetric-infer --maps` run: two lesion scans in non-RAS orientations and odd sizes, a
    lesion-free scan and a broken file; returns (exit code, rows by name, maps folder, cubes)."""
    root = tmp_path_factory.mktemp("maps")
    checkpoint = save(root / "lesion.pt", lesion_model, NATIVE)
    scans = root / "scans"
    a, cube_a = lesion_scan(scans / "flipped.nii.gz", (15, 16, 14), (2, 8, 5), FLIPPED_X, seed=10)
    b, cube_b = lesion_scan(scans / "permuted.nii", (14, 16, 15), (7, 1, 8), PERMUTED, seed=11)
    write_nifti(
        scans / "clean.nii.gz",
        np.random.default_rng(12).normal(100.0, 10.0, (16, 16, 16)),
        np.eye(4),
    )
    (scans / "broken.nii.gz").write_text("not a scan")
    maps = root / "maps"
    code = infer_main(
        [
            str(checkpoint),
            str(scans),
            "--output",
            str(root / "p.csv"),
            "--maps",
            str(maps),
            "--no-progress",
        ]
    )
    header, rows = read_csv(root / "p.csv")
    by_name = {scan_name(Path(row["path"])): row for row in rows}
    return code, header, by_name, maps, {"flipped": (a, cube_a), "permuted": (b, cube_b)}


# ------------------------------------------------------------------------------------- localization


@pytest.mark.slow  # `maps_run` trains `lesion_model` first (70 steps)
@pytest.mark.parametrize("name", ["flipped", "permuted"])
def test_map_peaks_at_the_planted_lesion(maps_run, name):
    """The map's maximum, in the scan file's own voxel indices, lies in the cube or within 2 voxels of it,
    and the cube holds several times more relevance per voxel than the rest."""
    _, _, rows, maps, scans = maps_run
    scan, cube = scans[name]
    assert rows[name]["prediction"] == "lesion"
    relevance = nib.load(str(maps / f"{name}_relevance.nii.gz")).get_fdata()
    peak = np.unravel_index(int(np.argmax(relevance)), relevance.shape)
    distance = max(max(c.start - p, p - (c.stop - 1), 0) for p, c in zip(peak, cube))
    assert distance <= 2, f"{name}: map peaks at {peak}, the cube is {cube}"
    inside = np.zeros(relevance.shape, dtype=bool)
    inside[cube] = True
    assert relevance[inside].mean() > 3 * relevance[~inside].mean()


# ----------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_map_has_the_input_scans_grid(stem, tmp_path):
    """Non-RAS orientation (permuted and flipped axes), anisotropic spacing, a size unlike the model's
    16³ training grid: the map has the shape and affine of the file as read from disk, and voxels
    cropped away by the preprocessing are 0; with either stem (both give the patch grid)."""
    torch.manual_seed(0)
    args = {**MODEL_ARGS, "pool": "mean", "stem": stem}
    resampled = {**NATIVE, "spacing": 1.5, "target_shape": [16, 16, 16]}
    checkpoint = save(tmp_path / "c.pt", VolumeTransformer(**args), resampled, args)
    affine = np.array(
        [[0, 0, -2.0, 30], [0.9, 0, 0, -10], [0, 1.3, 0, 5], [0, 0, 0, 1]]
    )  # file axes → A, S, L
    scan = write_nifti(
        tmp_path / "s" / "odd.nii.gz",
        np.random.default_rng(0).normal(100, 10, (21, 13, 17)),
        affine,
    )
    maps = tmp_path / "maps"
    assert (
        infer_main(
            [
                str(checkpoint),
                str(scan),
                "--output",
                str(tmp_path / "p.csv"),
                "--maps",
                str(maps),
                "--map-steps",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    original, relevance = nib.load(str(scan)), nib.load(str(maps / "odd_relevance.nii.gz"))
    assert relevance.shape == original.shape == (21, 13, 17)
    np.testing.assert_array_equal(relevance.affine, original.affine)
    assert nib.aff2axcodes(relevance.affine) == nib.aff2axcodes(original.affine) == ("A", "S", "L")
    data = relevance.get_fdata()
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 0
    # world x spans 17 × 2 mm = 34 mm, about 22 voxels at 1.5 mm, cropped to 16 (24 mm): both ends are outside
    assert data[:, :, :2].max() == 0 and data[:, :, -2:].max() == 0
    assert data[:, :, 4:-4].min() >= 0 and (data[:, :, 4:-4] > 0).any()


def test_mapping_back_is_exact_in_world_space(tmp_path):
    """A map on the preprocessed grid whose value is each voxel's world coordinate comes back, on the
    input grid, as the input voxels' world coordinates (linear interpolation is exact on a linear
    function) between the preprocessed grid's outer voxel centres, and as 0 beyond its edge."""
    affine = np.array([[0, 0, -2.0, 30], [0.9, 0, 0, -10], [0, 1.3, 0, 5], [0, 0, 0, 1]])
    scan = write_nifti(
        tmp_path / "odd.nii.gz", np.random.default_rng(0).normal(100, 10, (21, 13, 17)), affine
    )
    original = read_scan(scan)
    pipeline = build_preprocessing({**NATIVE, "spacing": 1.5, "target_shape": [16, 16, 16]}, PATCH)
    subject = preprocess_scan(scan, original, pipeline)
    assert subject.image.spatial_shape == (16, 16, 16)
    assert original.spatial_shape == (21, 13, 17)  # preprocessing left the image as read untouched
    np.testing.assert_array_equal(original.affine, nib.load(str(scan)).affine)
    # each input voxel's continuous index in the preprocessed grid: inside, at the edge, or outside it
    points = world_coordinates(original.spatial_shape, original.affine).reshape(3, -1)
    index = (np.linalg.inv(subject.image.affine) @ np.vstack([points, np.ones(points.shape[1])]))[
        :3
    ]
    index = index.reshape(3, *original.spatial_shape)
    upper = np.array(subject.image.spatial_shape).reshape(3, 1, 1, 1) - 1
    inside = ((index >= -1e-6) & (index <= upper + 1e-6)).all(axis=0)
    outside = ((index < -0.5 - 1e-6) | (index > upper + 0.5 + 1e-6)).any(axis=0)
    assert inside.mean() > 0.4 and outside.mean() > 0.1
    for axis in range(3):
        world = world_coordinates(subject.image.spatial_shape, subject.image.affine)[
            axis
        ]  # (16, 16, 16)
        back = to_input_grid(
            torch.from_numpy(world + 100.0).float(), subject.image.affine, original
        )  # (21, 13, 17)
        expected = (
            world_coordinates(original.spatial_shape, original.affine)[axis] + 100.0
        )  # all far from 0
        np.testing.assert_allclose(back[inside], expected[inside], atol=1e-3)
        assert (back[outside] == 0).all()


def world_coordinates(shape, affine: np.ndarray) -> np.ndarray:
    """(3, W, H, D) world (RAS) coordinates of the voxel centres of a grid."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def test_shares_split_the_logit_rise_from_an_empty_scan():
    """With a fine path the signed token shares add up to y(scan) − y(empty scan) (completeness), and
    the relevance is computed without touching the parameters' gradients."""
    torch.manual_seed(0)
    model = VolumeTransformer(
        **{**MODEL_ARGS, "depth": 2, "pool": "mean"}
    ).eval()  # smooth: the midpoints converge
    volume = torch.randn(1, 1, 12, 8, 16)
    logits, shares, target = token_shares(model, volume, target=1, steps=32)
    assert shares.shape == (3, 2, 4) and target == 1
    with torch.no_grad():
        rise = (model(volume) - model(torch.zeros_like(volume)))[0, 1].item()
    assert shares.sum().item() == pytest.approx(rise, rel=0.01)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits, model(volume))
    _, _, chosen = token_shares(model, volume, target=lambda out: int(out[0].argmin()), steps=1)
    assert chosen == int(logits[0].argmin())


# ------------------------------------------------------------------------------------- files, errors


@pytest.mark.slow  # `maps_run` trains `lesion_model` first (70 steps)
def test_montage_is_a_png(maps_run):
    _, _, _, maps, _ = maps_run
    for name in ("flipped", "permuted", "clean"):
        path = maps / f"{name}_relevance.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(str(path))  # (rows, columns, RGBA)
        assert (
            image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 0.01
        )


@pytest.mark.slow  # `maps_run` trains `lesion_model` first (70 steps)
def test_bad_scan_gets_its_error_row_and_no_map(maps_run):
    """Batch semantics hold with --maps: the broken file fails alone (exit status 1), the CSV columns
    are the usual ones, and every other scan has its row and its two map files, nothing else."""
    code, header, rows, maps, _ = maps_run
    assert code == 1
    assert header == ["path", "series_uid", "prediction", "prob_healthy", "prob_lesion", "error"]
    assert (
        rows["broken"]["error"]
        and rows["broken"]["prediction"] == ""
        and rows["broken"]["prob_lesion"] == ""
    )
    assert rows["clean"]["error"] == "" and rows["clean"]["prediction"] == "healthy"
    expected = {
        f"{name}_relevance.{ext}"
        for name in ("flipped", "permuted", "clean")
        for ext in ("nii.gz", "png")
    }
    assert {p.name for p in maps.iterdir()} == expected


def test_map_names_are_unique():
    scans = [
        Path("a/x.nii.gz"),
        Path("b/x.nii"),
        Path("c/x_2.nrrd"),
        Path("d/series1"),
        Path("e/x.NII.GZ"),
    ]
    assert [scan_name(s) for s in scans] == ["x", "x", "x_2", "series1", "x"]
    assert map_names(scans) == ["x", "x_3", "x_2", "series1", "x_4"]


def test_maps_need_the_token_model(tmp_path):
    """A checkpoint whose model has no tokens (e.g. the CNN baseline) cannot give maps: a user error."""
    torch.manual_seed(0)
    args = {"num_classes": 2, "in_channels": 1}
    path = tmp_path / "c.pt"
    save_checkpoint(
        path,
        model=build_model("densenet121", args),
        model_args=args,
        arch="densenet121",
        class_names=["healthy", "lesion"],
        preprocessing=NATIVE,
        config={},
    )
    predictor = Predictor(path)
    scan = write_nifti(tmp_path / "s.nii.gz", np.ones((8, 8, 8)), np.eye(4))
    with pytest.raises(VolumetricError, match="relevance maps need a vit3d checkpoint"):
        predict_to_csv(
            predictor, [scan], tmp_path / "p.csv", progress=False, maps=tmp_path / "maps"
        )
    assert not (tmp_path / "p.csv").exists()

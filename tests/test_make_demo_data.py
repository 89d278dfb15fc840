"""The regions task of scripts/make_demo_data.py: region boxes and lesion placement, on a synthetic
template (fast; the MNI152 template itself is not loaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_demo_data  # noqa: E402

# The 3 mm grid load_template makes of nilearn's 2 mm MNI152 template (RAS, origin at MNI 0)
SHAPE = (66, 78, 64)
AFFINE = np.array(
    [[3.0, 0, 0, -97.5], [0, 3.0, 0, -133.5], [0, 0, 3.0, -71.5], [0, 0, 0, 1]], dtype=float
)


def mni_of(voxels: np.ndarray) -> np.ndarray:
    return voxels @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def test_region_masks_are_the_documented_boxes():
    masks = make_demo_data.region_masks(SHAPE, AFFINE)
    assert list(masks) == ["left_frontal", "right_frontal", "left_posterior", "right_posterior"]
    assert make_demo_data.TASKS["regions"] == tuple(masks)
    total = sum(m.astype(int) for m in masks.values())
    assert total.max() == 1  # disjoint
    for name, mask in masks.items():
        x, y, z = mni_of(np.argwhere(mask)).T
        assert (x <= -10).all() if name.startswith("left") else (x >= 10).all()
        assert (y >= 10).all() if name.endswith("frontal") else (y <= -40).all()
        assert (z >= (-5 if name.endswith("frontal") else 0)).all()
    # mirror images of each other across the midline (the grid is symmetric about x = 0)
    assert np.array_equal(masks["left_frontal"], masks["right_frontal"][::-1])
    assert np.array_equal(masks["left_posterior"], masks["right_posterior"][::-1])


@pytest.mark.parametrize("region", ["left_frontal", "right_posterior"])
def test_a_regions_lesion_lies_inside_its_box(region):
    tissue = np.zeros(SHAPE, bool)
    tissue[4:-4, 4:-4, 4:-4] = True  # a synthetic "brain": everything but a border
    template = {
        "t1": np.ones(SHAPE, np.float32),
        "tissue": tissue,
        "wm": tissue,
        "affine": AFFINE,
        "regions": make_demo_data.region_masks(SHAPE, AFFINE),
    }
    for seed in range(3):
        volume = template["t1"].copy()
        rng = np.random.default_rng(seed)
        lesion = make_demo_data.add_lesion(volume, template, rng, 3.0, region=region)
        assert template["regions"][region][tuple(lesion["centre"].astype(int))]
        np.testing.assert_allclose(lesion["mni"], mni_of(lesion["centre"]))
        core = volume > 1.3  # the lesion proper (at least 1.6 inside, 1 outside)
        assert core.sum() > 10
        assert template["regions"][region][core].all()  # not a voxel of it outside the box
        assert not core[~tissue].any()


def test_the_regions_task_needs_every_class_in_both_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        make_demo_data.main([str(tmp_path / "x"), "--task", "regions", "--n-test", "3"])
    assert stopped.value.code == 2
    assert "--n-test >= 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_demo_data.main([str(tmp_path / "x"), "--task", "atlas"])


def test_the_voxels_do_not_depend_on_the_number_of_processes(tmp_path):
    """Subjects are seeded by their index: --jobs 2 writes the files --jobs 1 writes, byte for byte."""
    pytest.importorskip("nilearn")
    for jobs in (1, 2):
        make_demo_data.build_dataset(tmp_path / f"j{jobs}", n_train=3, n_test=2, jobs=jobs)
    serial = sorted(p.relative_to(tmp_path / "j1") for p in (tmp_path / "j1").rglob("*.nii.gz"))
    assert len(serial) == 5
    for path in [*serial, Path("manifest.csv")]:
        assert (tmp_path / "j1" / path).read_bytes() == (tmp_path / "j2" / path).read_bytes(), path

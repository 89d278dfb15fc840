#!/usr/bin/env python
"""Build the offline demo data sets: brain MRI volumes with a synthetic lesion.

Every subject starts from the MNI152 2009 T1 template that ships inside nilearn (no download),
resampled to ``--spacing`` mm, and gets its own random affine and elastic deformation, bias field,
gamma change and Rician noise. A lesion is one soft-edged hyperintense ellipsoid (radius 8-16 mm
per axis, random orientation and contrast), placed fully inside grey or white matter and added
before the degradations, so that it is degraded like the rest of the scan. Two tasks:

``--task lesion`` (the default, the demo): classes ``lesion`` and ``no_lesion``, half the
subjects of each; the lesion may sit anywhere in the brain.

``--task regions``: every subject carries one lesion, and the class is the region it lies in,
four classes of equal size. Regions are boxes of MNI152 coordinates (mm; x grows to the
subject's right, y to the front, z upwards), and the whole ellipsoid (plus a voxel) lies inside
both its region's box and the brain tissue:

    left_frontal      x <= -10   y >= +10   z >= -5
    right_frontal     x >= +10   y >= +10   z >= -5
    left_posterior    x <= -10   y <= -40   z >= 0
    right_posterior   x >= +10   y <= -40   z >= 0

The frontal boxes hold the frontal lobes above the temporal poles; the posterior boxes the
parietal and occipital lobes and the hind ends of the temporal lobes, above the cerebellum. A
lesion never comes nearer than 10 mm to the midline, and frontal and posterior lesions are at
least 50 mm apart, so the class is unambiguous. The template is symmetric between left and
right: only the side of the lesion tells ``left_*`` from ``right_*``, so a left-right flip must
not be used as augmentation on this task.

    python scripts/make_demo_data.py OUTPUT_DIR [--task lesion] [--n-train 400] [--n-test 1000]
                                     [--seed 0] [--spacing 3] [--jobs 4] [--force]

writes ``{train,test}/<class>/sub-XXXX.nii.gz`` (int16, MR-like units) and ``manifest.csv``
(lesion centres in output voxels and, before the deformation, in MNI mm; equivalent-sphere radii
in mm). The same arguments give the same voxels, and the lesion set's first subjects are the same
whatever ``--n-test``. The set is built in a sibling folder and renamed into place,
``.demo_args.json`` written last, so an interrupted run never leaves a half set that looks
complete; a complete set made with the same arguments is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

log = logging.getLogger("make_demo_data")
CLASSES = ("lesion", "no_lesion")
# --task regions: {class: {axis: (low, high)}} in MNI152 mm, None for an open end (module docstring)
REGIONS: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "left_frontal": {"x": (None, -10.0), "y": (10.0, None), "z": (-5.0, None)},
    "right_frontal": {"x": (10.0, None), "y": (10.0, None), "z": (-5.0, None)},
    "left_posterior": {"x": (None, -10.0), "y": (None, -40.0), "z": (0.0, None)},
    "right_posterior": {"x": (10.0, None), "y": (None, -40.0), "z": (0.0, None)},
}
TASKS = {"lesion": CLASSES, "regions": tuple(REGIONS)}
MANIFEST_COLUMNS = [
    "path",
    "label",
    "split",
    "lesion_center_vox_x",
    "lesion_center_vox_y",
    "lesion_center_vox_z",
    "lesion_radius_mm",
    "lesion_center_mni_x",
    "lesion_center_mni_y",
    "lesion_center_mni_z",
]
FORMAT_VERSION = 3  # bump when the generator changes, so old sets are rebuilt
LESION_RADIUS_MM = (8.0, 16.0)  # per ellipsoid axis
LESION_CONTRAST = (0.6, 1.2)  # lesion intensity = (1 + contrast) x local white-matter intensity


class UserError(Exception):
    """A problem the user can fix (bad output path, missing package): one line, exit status 2."""


def load_template(spacing: float) -> dict[str, np.ndarray]:
    """MNI152 T1 (white matter ~1), tissue and white-matter masks on a ``spacing`` mm grid, and its affine.

    The new grid covers the template's field of view (same outer edges, RAS orientation).
    """
    try:
        from nilearn import datasets  # the demo extra; imported here so --help works without it
    except ImportError:
        raise UserError(
            "nilearn is not installed; install the demo extra: pip install -e '.[demo]'"
        ) from None
    t1, gm, wm = (
        load(resolution=2)
        for load in (
            datasets.load_mni152_template,
            datasets.load_mni152_gm_template,
            datasets.load_mni152_wm_template,
        )
    )
    step = float(t1.header.get_zooms()[0])
    factor = spacing / step
    shape = np.ceil(np.array(t1.shape) / factor).astype(int)
    # Centre of new voxel i, in old voxel coordinates (edges aligned at -0.5).
    centres = [(np.arange(n) + 0.5) * factor - 0.5 for n in shape]
    grid = np.meshgrid(*centres, indexing="ij")
    sigma = np.sqrt(max(factor**2 - 1.0, 0.0)) / 2.355  # anti-aliasing when downsampling

    def resample(image: nib.Nifti1Image) -> np.ndarray:
        data = ndimage.gaussian_filter(np.asarray(image.get_fdata(), np.float32), sigma)
        return ndimage.map_coordinates(data, grid, order=1, mode="constant", cval=0.0)

    t1_map, gm_map, wm_map = resample(t1), resample(gm), resample(wm)
    wm_mask = wm_map > 0.5
    affine = t1.affine.copy()
    affine[:3, :3] *= factor
    affine[:3, 3] = t1.affine[:3, :3] @ np.full(3, 0.5 * factor - 0.5) + t1.affine[:3, 3]
    return {
        "t1": t1_map / np.median(t1_map[wm_mask]),
        "tissue": (gm_map + wm_map) > 0.5,
        "wm": wm_mask,
        "affine": affine,
        "regions": region_masks(t1_map.shape, affine),
    }


def region_masks(shape: tuple[int, ...], affine: np.ndarray) -> dict[str, np.ndarray]:
    """{region name: bool mask of ``shape``}: the voxels whose centre lies in the region's MNI box."""
    voxels = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    mni = voxels @ affine[:3, :3].T + affine[:3, 3]  # (W, H, D, 3) mm
    masks = {}
    for name, box in REGIONS.items():
        mask = np.ones(shape, dtype=bool)
        for axis, (low, high) in enumerate(box[a] for a in "xyz"):
            if low is not None:
                mask &= mni[..., axis] >= low
            if high is not None:
                mask &= mni[..., axis] <= high
        masks[name] = mask
    return masks


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation matrix from three random Euler angles in [-max_degrees, max_degrees]."""
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.cache
def _upsampler(size: int, control: int) -> np.ndarray:
    """(size, control) matrix doing 1-D cubic-spline upsampling of ``control`` values to ``size`` samples."""
    return np.stack(
        [
            ndimage.zoom(unit, size / control, order=3, mode="nearest", grid_mode=True)
            for unit in np.eye(control)
        ],
        axis=1,
    )


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], control: int, std: float
) -> np.ndarray:
    """A smooth random field: normal values on a ``control``^3 grid, cubic-spline upsampled to ``shape``.

    Spline upsampling is separable, so it is done one axis at a time with small matrices (fast).
    """
    field = rng.normal(0.0, std, size=(control,) * 3)
    for size in shape:  # each pass upsamples the first axis and moves it to the end
        field = np.tensordot(field, _upsampler(size, control), axes=([0], [1]))
    return field.astype(np.float32)


def add_lesion(
    volume: np.ndarray,
    template: dict,
    rng: np.random.Generator,
    spacing: float,
    region: str | None = None,
) -> dict:
    """Blend a soft hyperintense ellipsoid, fully inside grey/white matter (and inside ``region``,
    a key of ``template["regions"]``, when given), into ``volume`` (in place)."""
    radii = rng.uniform(*LESION_RADIUS_MM, size=3) / spacing  # voxels, along the lesion's own axes
    rotation = random_rotation(rng, 180.0)
    half = int(np.ceil(radii.max())) + 2
    offsets = np.stack(np.meshgrid(*[np.arange(-half, half + 1)] * 3, indexing="ij"), axis=-1)
    # 1 on the ellipsoid surface
    distance = np.sqrt((((offsets @ rotation) / radii) ** 2).sum(axis=-1))
    # Candidate centres: where the whole ellipsoid (and a voxel of margin) lies inside the tissue mask.
    footprint = distance <= 1.0 + 1.0 / radii.min()
    allowed = (
        template["tissue"] if region is None else template["tissue"] & template["regions"][region]
    )
    inside = ndimage.binary_erosion(allowed, structure=footprint, border_value=0)
    interior = np.zeros_like(inside)
    interior[tuple(slice(half, n - half) for n in inside.shape)] = (
        True  # the box around the centre fits too
    )
    inside &= interior
    candidates = np.argwhere(inside)
    if len(candidates) == 0:
        where = "the brain" if region is None else f"region {region}"
        raise ValueError(f"no room for a lesion inside {where} at this spacing")
    centre = candidates[rng.integers(len(candidates))]
    box = tuple(slice(c - half, c + half + 1) for c in centre)
    wm_near = template["t1"][box][template["wm"][box]]
    level = (1.0 + rng.uniform(*LESION_CONTRAST)) * (
        np.median(wm_near) if wm_near.size > 10 else 1.0
    )
    edge_mm = 1.0  # width of the soft edge
    weight = 1.0 / (1.0 + np.exp((distance - 1.0) * radii.mean() * spacing / edge_mm))
    volume[box] = (1.0 - weight) * volume[box] + weight * level
    mni = template["affine"][:3, :3] @ centre + template["affine"][:3, 3]
    return {
        "centre": centre.astype(float),
        "mni": mni,
        "radius_mm": float(np.prod(radii) ** (1 / 3) * spacing),
    }


def make_subject(
    template: dict,
    rng: np.random.Generator,
    with_lesion: bool,
    spacing: float,
    region: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One subject: (int16 volume, RAS affine, lesion info: output-voxel ``centre``, ``radius_mm``
    and ``mni``, the centre in template mm before the deformation). ``region``: where the lesion
    goes (a key of ``REGIONS``; None: anywhere in the brain)."""
    volume = template["t1"].copy()
    lesion = add_lesion(volume, template, rng, spacing, region) if with_lesion else {}

    # Geometry: output voxel x samples source point A (x - c) + c + t + elastic(x).
    shape = volume.shape
    c = (np.array(shape) - 1) / 2
    matrix = random_rotation(rng, 8.0) * rng.uniform(0.93, 1.07, size=3)
    shift = rng.uniform(-2.0, 2.0, size=3)
    elastic = np.stack([smooth_field(rng, shape, control=4, std=1.0) for _ in range(3)])
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    source = (
        np.tensordot(matrix, grid - c[:, None, None, None], axes=1)
        + (c + shift)[:, None, None, None]
        + elastic
    )
    volume = ndimage.map_coordinates(volume, source, order=1, mode="constant", cval=0.0)

    volume *= np.exp(smooth_field(rng, shape, control=3, std=0.15))  # multiplicative bias field
    volume = np.clip(volume, 0.0, None) ** rng.uniform(0.75, 1.35)  # global contrast (gamma)
    sigma = rng.uniform(0.03, 0.07)  # Rician noise, relative to white matter ~1
    volume = np.hypot(volume + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    volume = np.round(volume * rng.uniform(400.0, 1200.0)).astype(np.int16)  # MR-like integer units

    if lesion:  # where the lesion centre went: solve A (x - c) + t + elastic(x) = centre - c for x
        inverse, target = np.linalg.inv(matrix), lesion["centre"] - c - shift
        x = inverse @ target + c
        for _ in range(10):
            x = (
                inverse
                @ (target - [ndimage.map_coordinates(e, x[:, None], order=1)[0] for e in elastic])
                + c
            )
        lesion = {
            "centre": x,
            "mni": lesion["mni"],
            "radius_mm": lesion["radius_mm"] / np.linalg.det(matrix) ** (1 / 3),
        }
    return volume, template["affine"], lesion


def is_complete(output: Path, args: dict) -> bool:
    """True if ``output`` holds a finished set made with ``args`` (stamp matches, every listed file exists)."""
    try:
        if json.loads((output / ".demo_args.json").read_text()) != args:
            return False
        with (output / "manifest.csv").open(newline="") as handle:
            paths = [row["path"] for row in csv.DictReader(handle)]
    except (OSError, ValueError, KeyError):
        return False
    return len(paths) == args["n_train"] + args["n_test"] and all(
        (output / path).is_file() for path in paths
    )


def write_subject(
    folder: Path,
    template: dict[str, np.ndarray],
    task: str,
    n_train: int,
    seed: int,
    spacing: float,
    index: int,
) -> list[str]:
    """Make subject ``index`` of ``task``, write it under ``folder``; its manifest row."""
    classes = TASKS[task]
    split, position = ("train", index) if index < n_train else ("test", index - n_train)
    label = classes[position % len(classes)]
    if task == "lesion":
        rng = np.random.default_rng([seed, index])
        volume, affine, lesion = make_subject(template, rng, label == "lesion", spacing)
    else:  # a stream of its own, independent of the lesion set's subject of this index
        rng = np.random.default_rng([seed, index, 1])
        volume, affine, lesion = make_subject(template, rng, True, spacing, region=label)
    path = Path(split, label, f"sub-{index + 1:04d}.nii.gz")
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, folder / path)
    centre = [f"{v:.2f}" for v in lesion["centre"]] if lesion else ["", "", ""]
    mni = [f"{v:.1f}" for v in lesion["mni"]] if lesion else ["", "", ""]
    radius = f"{lesion['radius_mm']:.2f}" if lesion else ""
    return [path.as_posix(), label, split, *centre, radius, *mni]


def build_dataset(
    output: Path,
    n_train: int = 400,
    n_test: int = 1000,
    seed: int = 0,
    spacing: float = 3.0,
    force: bool = False,
    task: str = "lesion",
    jobs: int = 1,
) -> bool:
    """Write the data set of ``task`` (a key of ``TASKS``) to ``output`` with ``jobs`` processes;
    returns False when an identical complete set is already there."""
    output = Path(output)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    args = {
        "task": task,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "spacing": spacing,
        "version": FORMAT_VERSION,
    }
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a folder")
    if not force and is_complete(output, args):
        log.info("%s already holds this demo set; nothing to do (--force rebuilds it)", output)
        return False
    if (
        output.is_dir()
        and any(output.iterdir())
        and not (output / ".demo_args.json").exists()
        and not force
    ):
        raise UserError(
            f"{output} is a non-empty folder that is not a demo set; choose another or pass --force"
        )
    started = time.perf_counter()
    template = load_template(spacing)
    # fixed name: a killed run's leftovers are cleared next time
    tmp = output.parent / f".{output.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subject = functools.partial(write_subject, tmp, template, task, n_train, seed, spacing)
        indices = range(n_train + n_test)
        rows = []
        # fork: the workers inherit the template; subjects are seeded by index, so the voxels do not
        # depend on --jobs (tests/test_make_demo_data.py)
        with multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else nullcontext() as pool:
            mapped = pool.imap(subject, indices, chunksize=4) if pool else map(subject, indices)
            for index, row in enumerate(mapped):
                rows.append(row)
                if (index + 1) % 50 == 0:
                    log.info("%d/%d volumes", index + 1, len(indices))
        with (tmp / "manifest.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([MANIFEST_COLUMNS, *rows])
        # last: marks the set complete
        (tmp / ".demo_args.json").write_text(json.dumps(args, indent=2) + "\n")
        if output.exists():  # move the old set aside first, so `output` is never a mix of both
            old = output.parent / f".{output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "wrote %d volumes of %s voxels at %g mm to %s in %.1f s",
        len(rows),
        "x".join(map(str, template["t1"].shape)),
        spacing,
        output,
        time.perf_counter() - started,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output", type=Path, metavar="OUTPUT_DIR", help="folder to write the data set to"
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="lesion",
        help="lesion: lesion vs no_lesion; regions: which of four regions holds the lesion (lesion)",
    )
    parser.add_argument(
        "--n-train", type=int, default=400, help="training volumes, classes in equal parts (400)"
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=1000,
        help="held-out test volumes, classes in equal parts (1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes writing subjects; the voxels do not depend on it (min(4, CPUs))",
    )
    parser.add_argument(
        "--spacing", type=float, default=3.0, help="isotropic voxel size in mm (3.0)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if an identical set exists"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    least = max(2, len(TASKS[args.task]))  # every class in both splits
    if (
        min(args.n_train, args.n_test) < least
        or args.seed < 0
        or args.jobs < 1
        or not 1.0 <= args.spacing <= 8.0
    ):
        # parser.error exits with 2
        parser.error(
            f"need --n-train >= {least}, --n-test >= {least}, --seed >= 0, --jobs >= 1 "
            "and 1 <= --spacing <= 8"
        )
    try:
        build_dataset(
            args.output,
            args.n_train,
            args.n_test,
            args.seed,
            args.spacing,
            args.force,
            task=args.task,
            jobs=args.jobs,
        )
    except (UserError, OSError, ValueError) as error:
        print(f"make_demo_data: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

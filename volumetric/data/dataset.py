"""Reading scans, and ScanDataset: scans → preprocessed (and, for training, augmented) tensors.

Preprocessing is deterministic, so each scan is read and preprocessed once and cached (on disk,
memory-mapped, by default: volumetric/data/cache.py); augmentation is random and runs on every
access, seeded by (seed, epoch, scan).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from volumetric.data.cache import DiskCache
from volumetric.data.dicom import read_series
from volumetric.data.source import ImageRef, ScanSource
from volumetric.errors import VolumetricError, first_line

log = logging.getLogger(__name__)

ImageT = TypeVar("ImageT", bound=tio.Image)


MAX_VOXELS = 2**31
"""Scans whose header claims more voxels than this (8 GiB as float32) are refused before loading."""


def check_header(path: Path, *, strict: bool = True):
    """Refuse missing, empty, unreadable or absurd files from their header alone, before any
    voxel is read; returns SimpleITK's reader with the header information. A header SimpleITK
    cannot parse is a VolumetricError when ``strict``, else None (another reader may manage)."""
    import SimpleITK as sitk

    if not path.exists():
        raise VolumetricError(f"{path}: no such file or folder")
    if path.stat().st_size == 0:
        raise VolumetricError(f"{path}: empty file")
    if not os.access(path, os.R_OK):
        raise VolumetricError(f"{path}: permission denied")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        if strict:
            raise VolumetricError(f"{path}: cannot read scan: not an image file") from None
        return None
    size = reader.GetSize()
    voxels = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents()
    if voxels > MAX_VOXELS:
        shape = "×".join(map(str, size))
        raise VolumetricError(
            f"{path}: header claims {shape} voxels ({voxels:.2e}); refusing to load it"
        )
    return reader


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _read_nifti(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """NIfTI through nibabel, which is strict where SimpleITK (TorchIO's first choice) is not: ITK's
    reader zero-fills a truncated .nii.gz and turns NaN voxels into 0 without a word. Returns
    (C, W, H, D) data in TorchIO's layout (a 4D series becomes channels) and the RAS affine."""
    import nibabel as nib

    # nib.load is typed FileBasedImage; a .nii(.gz) file loads as a Nifti1Image (or Nifti2Image)
    image = cast("nib.Nifti1Image", nib.load(str(path), mmap=False))
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 5 and data.shape[3] == 1:  # (W, H, D, 1, C): NIfTI's vector-valued form
        data = data[:, :, :, 0]
    if data.ndim == 4:  # (W, H, D, C) → (C, W, H, D)
        data = data.transpose(3, 0, 1, 2)
    elif data.ndim <= 3:  # (W[, H[, D]]) → (1, W, H, D)
        data = data.reshape((1, *data.shape, *([1] * (3 - data.ndim))))
    else:
        raise ValueError(f"a {data.ndim}D array of shape {data.shape} is not a volume")
    return torch.from_numpy(np.ascontiguousarray(data)), np.asarray(image.affine, dtype=np.float64)


def read_scan(scan: str | Path | ImageRef | ScanSource) -> tio.ScalarImage:
    """Read a scan through TorchIO (orientation and spacing honoured) and check that it is a usable
    3D volume; every problem is a VolumetricError naming the scan. The images of a scan of several
    (one per channel) are resampled onto the first one's grid and stacked."""
    source = ScanSource.of(scan)
    first = read_image(source.images[0])
    if len(source.images) == 1:
        return first
    channels = [first.data]  # each (C_i, W, H, D) on the first image's grid
    for ref in source.images[1:]:
        image = read_image(ref)
        check_overlap(first, image, ref)
        resample = tio.Resample((first.spatial_shape, first.affine))
        channels.append(resample(image).data)
    stacked = tio.ScalarImage(tensor=torch.cat(channels), affine=first.affine)
    return check_volume(stacked, source)


def check_overlap(reference: tio.Image, image: tio.Image, ref: ImageRef) -> None:
    """A channel must cover at least half of the first channel's physical extent: anything less
    is another body part or a mismatched file, not the same subject's scan."""
    low, high = _world_box(reference)
    other_low, other_high = _world_box(image)
    inside = np.clip(np.minimum(high, other_high) - np.maximum(low, other_low), 0, None)
    share = float(np.prod(inside) / max(np.prod(high - low), 1e-12))
    if share < 0.5:
        raise VolumetricError(
            f"{ref}: covers {share:.0%} of the first channel's physical extent (at least 50% "
            "is needed); is it the same subject and body part?"
        )


def _world_box(image: tio.Image) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned box (mm, RAS) holding the image's voxel centres, each grown by half a
    voxel: (low (3,), high (3,))."""
    shape = np.asarray(image.spatial_shape, dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij"))
    corners = corners.reshape(3, -1)  # (3, 8) voxel coordinates
    world = image.affine[:3, :3] @ corners + image.affine[:3, 3:4]  # (3, 8) mm
    return world.min(axis=1), world.max(axis=1)


def read_image(ref: ImageRef) -> tio.ScalarImage:
    """One image of a scan (a file, or a DICOM series: a folder and its series), loaded and
    checked."""
    path = ref.path
    if not path.exists():
        raise VolumetricError(f"{path}: no such file or folder")
    if path.is_dir():
        return check_volume(read_series(path, ref.series_uid, str(ref)), ref)
    check_header(path, strict=False)  # SimpleITK may not parse it: the readers below say why
    nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
    image = tio.ScalarImage(path, reader=_read_nifti) if nifti else tio.ScalarImage(path)
    try:
        # TorchIO warns before falling back from SimpleITK to nibabel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except MemoryError:
        raise VolumetricError(f"{path}: too large to load into memory") from None
    except Exception as error:  # nibabel, SimpleITK and TorchIO raise many types for a broken file
        detail = first_line(error)
        detail = (
            "" if "not understood" in detail else f" ({detail})"
        )  # TorchIO's generic message adds nothing
        raise VolumetricError(
            f"{path}: cannot read scan: not an image file, or truncated{detail}"
        ) from None
    return check_volume(image, ref)


def check_volume(image: ImageT, source: str | Path | ImageRef | ScanSource) -> ImageT:
    """``image`` (loaded) if it is a 3D volume of finite values, else a VolumetricError naming
    ``source``; shared by scans read from disk and volumes handed over in memory."""
    spatial = image.spatial_shape
    if sum(n > 1 for n in spatial) < 3:
        raise VolumetricError(f"{source}: a {'×'.join(map(str, spatial))} image is not a 3D volume")
    if torch.isfinite(image.data).all():  # the common case, one pass: no count needed
        return image
    bad = int((~torch.isfinite(image.data)).sum())
    if bad:
        raise VolumetricError(f"{source}: {bad} voxel(s) are NaN or infinite")
    return image


def load_subject(
    scan: Path | ScanSource, preprocess: tio.Transform, in_channels: int = 1
) -> tio.Subject:
    """Read and preprocess one scan into a Subject whose ``image`` is (C, W, H, D) float32."""
    return preprocess_scan(scan, read_scan(scan), preprocess, in_channels)


def preprocess_scan(
    path: Path | ScanSource | str,
    image: tio.Image,
    preprocess: tio.Transform,
    in_channels: int = 1,
) -> tio.Subject:
    """Preprocess ``image`` (as `read_scan` gave it for ``path``, left unchanged) into a Subject whose
    ``image`` is (C, W, H, D) float32; errors are VolumetricErrors naming ``path``."""
    if image.num_channels != in_channels:
        raise VolumetricError(
            f"{path}: scan has {image.num_channels} channels or time points, the model takes {in_channels} "
            "(split a series into 3D volumes, or train with model.in_channels set to match)"
        )
    # TorchIO draws a random number in every transform call, deterministic ones included: keep the
    # global RNG untouched, so that augmentation does not depend on which scans were cached
    with torch.random.fork_rng(devices=[]):
        try:
            return preprocess(tio.Subject(image=image))
        except VolumetricError as error:
            # raised by a preprocessing step, which does not know the file
            raise VolumetricError(f"{path}: {error}") from None


CACHE_MODES = ("disk", "memory", "none")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one scan's augmentation in one epoch: a pure function of its arguments, so the
    same run draws the same views whatever the number of workers, processes or resumes."""
    return (seed * 1_000_003 + epoch) * 100_000_007 + index


class ScanDataset(Dataset):
    """Preprocessed (and, when ``augment`` is set, augmented) scans.

    Items are dicts: image (C, W, H, D) float32, label (int, -1 when unknown), index (int). A key
    is an index, or (index, epoch) for training: augmentation then draws from
    `augmentation_seed` (seed, epoch, index) in a forked RNG. A scan that fails gives
    ``{"error": message, "index": index}`` rather than raising, so that the one-line message
    reaches the main process unchanged from a DataLoader worker (`volumetric.data.loading`).

    ``cache``: ``disk`` (a `DiskCache`, memory-mapped, shared by workers and runs), ``memory``
    (kept in this process: each worker builds its own copy), or ``none`` (read every time).
    """

    def __init__(
        self,
        items: list[tuple[ScanSource, int]],
        preprocess: tio.Transform,
        *,
        augment: tio.Transform | None = None,
        cache: str = "none",
        disk_cache: DiskCache | None = None,
        in_channels: int = 1,
        seed: int = 0,
    ):
        if cache not in CACHE_MODES or (cache == "disk") != (disk_cache is not None):
            raise ValueError(f"cache={cache!r} needs disk_cache exactly when it is 'disk'")
        self.items = items
        self.preprocess = preprocess
        self.augment = augment
        self.in_channels = in_channels
        self.seed = seed
        self.disk_cache = disk_cache
        self._memory: dict[int, tuple[torch.Tensor, Any]] | None = {} if cache == "memory" else None

    def __len__(self) -> int:
        return len(self.items)

    def subject(self, index: int) -> tio.Subject:
        """The preprocessed (not augmented) subject of item ``index``; VolumetricError if the scan
        cannot be read or preprocessed."""
        path = self.items[index][0]
        cached = self._cached(index)
        if cached is not None:
            data, affine = cached
            return tio.Subject(image=tio.ScalarImage(tensor=data, affine=affine))
        subject = load_subject(path, self.preprocess, self.in_channels)
        data, affine = subject.image.data, subject.image.affine
        if self.disk_cache is not None:
            subject.image.set_data(self.disk_cache.store(path, data, affine))
        if self._memory is not None:
            self._memory[index] = (data, affine)
        return subject

    def _cached(self, index: int) -> tuple[torch.Tensor, np.ndarray] | None:
        if self._memory is not None and index in self._memory:
            data, affine = self._memory[index]
            return data.clone(), affine
        if self.disk_cache is not None:
            return self.disk_cache.load(self.items[index][0])
        return None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        try:
            subject = self.subject(index)
            if self.augment is not None and epoch is None:
                subject = self.augment(subject)  # from the global RNG
            elif self.augment is not None:
                assert epoch is not None  # None took the branch above
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(augmentation_seed(self.seed, epoch, index))
                    subject = self.augment(subject)
        except VolumetricError as error:
            return {"error": str(error), "index": index}
        return {"image": subject.image.data.float(), "label": self.items[index][1], "index": index}

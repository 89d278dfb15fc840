"""DICOM series: which folders hold them, which of them are 3D volumes, and reading one.

A folder holds DICOM series when GDCM (through SimpleITK) finds any in it, whatever its files are
called: PACS exports name them IM0001, IM0002, ... without a suffix. GDCM groups the files by
SeriesInstanceUID from their headers; pixel data is read only when a series is read as a scan.

A series is one scan, but not every series is a 3D volume. Refused (`volume_problem`): localizers
and scouts (ImageType LOCALIZER, or fewer than `MIN_SLICES` slices), slices without position or
orientation, slices of differing orientation (a multi-plane localizer), and slices sharing a
position (several volumes in one series: time points, echoes). Read with a warning
(`spacing_problem`): gaps and non-uniform slice spacing, measured as the slices' positions
(ImagePositionPatient) along the normal of their orientation (ImageOrientationPatient). ITK then
places the slices evenly between the first and the last one, so the voxels are only roughly where
the scanner put them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from volumetric.errors import VolumetricError, first_line

if TYPE_CHECKING:  # TorchIO is imported where a series is read: listing headers needs none of it
    import torchio as tio

log = logging.getLogger(__name__)

MIN_SLICES = 3
"""Fewer slices are not a volume. One or two slices are what scouts, key images and single-slice
acquisitions are made of; three are the fewest whose spacing can be checked (two steps to compare),
and a 3D patch model sees at least a slab. Whether a volume of three or more slices is large enough
for a model is the model's question (pre-flight compares the resampled grid with its patch)."""

SPACING_TOLERANCE = 0.01
"""Slice steps may differ by this fraction of the typical step before the spacing counts as
non-uniform: positions are decimal strings of up to 16 characters, whose rounding is far below 1%,
while a missing slice or a change of spacing is at least tens of percent."""

GAP = 1.5
"""A step this many times the typical one is a gap (missing slices), not a merely uneven spacing."""

SAME_POSITION_MM = 1e-3
"""Two slices closer than this along the normal are at the same position."""


@contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK's warnings (GDCM's "No Series were found", the series reader's "Non uniform sampling")
    go to the process's stderr unasked; this module says what matters in its own words."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def series_uids(folder: Path) -> tuple[str, ...]:
    """The SeriesInstanceUIDs of the DICOM files in ``folder`` (not its sub-folders), from their
    headers; () when it holds none."""
    import SimpleITK as sitk

    with quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def series_files(folder: Path, uid: str) -> list[Path]:
    """The files of series ``uid`` in ``folder``, in slice order. Remembered while the folder's
    modification time stays (a file added, removed or renamed changes it): the disk cache asks on
    every access."""
    mtime = Path(folder).stat().st_mtime_ns
    return [Path(p) for p in _series_files(str(folder), uid, mtime)]


@functools.lru_cache(maxsize=1024)
def _series_files(folder: str, uid: str, mtime: int) -> tuple[str, ...]:
    import SimpleITK as sitk

    with quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))


@dataclass(frozen=True)
class SliceHeader:
    """What one file of a series says about its place, from its header alone."""

    position: tuple[float, ...] | None  # ImagePositionPatient (0020|0032), mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (0020|0037): row, column
    image_type: str  # ImageType (0008|0008), e.g. ORIGINAL\PRIMARY\LOCALIZER
    frames: int  # images in the file (more than 1: a multi-frame file)
    modality: str = ""  # Modality (0008|0060), e.g. CT, MR, PT
    description: str = ""  # SeriesDescription (0008|103e)


def slice_headers(files: list[Path]) -> list[SliceHeader]:
    """The headers of a series' files (no pixel data is read); RuntimeError for a file that is
    not a DICOM image."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    headers = []
    with quiet_itk():
        for path in files:
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            headers.append(
                SliceHeader(
                    position=_numbers(reader, "0020|0032", 3),
                    orientation=_numbers(reader, "0020|0037", 6),
                    image_type=_text(reader, "0008|0008"),
                    frames=int(size[2]) if len(size) > 2 else 1,
                    modality=_text(reader, "0008|0060").upper(),
                    description=_text(reader, "0008|103e"),
                )
            )
    return headers


def _text(reader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _values(text: str) -> list[str]:
    """The values of a multi-valued DICOM string: backslash-separated, space-padded."""
    return [value.strip() for value in text.split("\\")]


def _numbers(reader, tag: str, count: int) -> tuple[float, ...] | None:
    """A backslash-separated list of ``count`` numbers (a DICOM DS value), None if absent or odd."""
    try:
        values = tuple(float(v) for v in _values(_text(reader, tag)))
    except ValueError:
        return None
    return values if len(values) == count else None


def volume_problem(slices: list[SliceHeader]) -> str:
    """Why a series of these slices is not a 3D volume; '' when it is one."""
    if any("LOCALIZER" in _values(s.image_type.upper()) for s in slices):
        return "a localizer (ImageType LOCALIZER)"
    count = sum(s.frames for s in slices)
    if count < MIN_SLICES:
        return f"{count} slice(s), fewer than {MIN_SLICES}: a scout or a single slice"
    if any(s.frames > 1 for s in slices):
        return ""  # multi-frame: the geometry is per frame, inside the file; GDCM reads it
    if any(s.position is None or s.orientation is None for s in slices):
        return "slices without ImagePositionPatient or ImageOrientationPatient: no 3D geometry"
    # none is None (checked above)
    orientations = cast("list[tuple[float, ...]]", [s.orientation for s in slices])
    if any(not np.allclose(o, orientations[0], atol=1e-4) for o in orientations):
        return "image orientation differs across its files (several planes, as in a localizer)"
    steps = np.diff(slice_positions(slices))
    if (steps < SAME_POSITION_MM).any():
        return (
            f"{len(slices)} slices at {int((steps >= SAME_POSITION_MM).sum()) + 1} positions: "
            "several volumes in one series (time points, echoes?)"
        )
    return ""


def slice_positions(slices: list[SliceHeader]) -> np.ndarray:
    """(N,) the slices' positions along the normal of their (common) orientation, mm, sorted."""
    orientation = np.asarray(slices[0].orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])  # (3,)
    return np.sort(np.asarray([s.position for s in slices], dtype=np.float64) @ normal)


def spacing_problem(slices: list[SliceHeader]) -> str:
    """A gap or non-uniform spacing between the slices of a volume (`volume_problem` ''); '' when
    the slices are evenly spaced or their geometry is inside multi-frame files."""
    if len(slices) < 3 or any(s.frames > 1 for s in slices):
        return ""
    positions = slice_positions(slices)
    steps = np.diff(positions)  # (N - 1,)
    typical = float(np.median(steps))
    if steps.max() - steps.min() <= SPACING_TOLERANCE * typical:
        return ""
    even = (positions[-1] - positions[0]) / (len(positions) - 1)
    placed = f"its slices are read as if evenly {even:.3g} mm apart"
    if steps.max() > GAP * typical:
        return (
            f"a gap of {steps.max():.3g} mm between slices {typical:.3g} mm apart (missing "
            f"slices?); {placed}"
        )
    return f"non-uniform slice spacing ({steps.min():.3g} to {steps.max():.3g} mm); {placed}"


def series_headers(folder: Path, uid: str | None, name: str) -> list[SliceHeader]:
    """The slice headers of series ``uid`` of ``folder`` (see `choose_series`); a
    VolumetricError naming ``name`` when there is no such series or a file is not DICOM."""
    uid = choose_series(folder, uid, name)
    try:
        return slice_headers(series_files(folder, uid))
    except RuntimeError as error:
        raise VolumetricError(
            f"{name}: cannot read DICOM series {uid}: a file is not a DICOM image "
            f"({first_line(error)})"
        ) from None


def series_problem(folder: Path, uid: str) -> str:
    """Why series ``uid`` of ``folder`` is not a 3D volume ('' when it is one), from headers."""
    try:
        return volume_problem(slice_headers(series_files(folder, uid)))
    except RuntimeError as error:
        return f"a file of it is not a DICOM image ({first_line(error)})"


def choose_series(folder: Path, uid: str | None, name: str) -> str:
    """The series to read from ``folder``: ``uid``, or without one the folder's only series (or
    its only volume beside localizers); VolumetricError naming ``name`` otherwise."""
    uids = series_uids(folder)
    if not uids:
        raise VolumetricError(f"{name}: no DICOM series in this folder")
    if uid is not None:
        if uid not in uids:
            raise VolumetricError(f"{name}: the folder holds no DICOM series {uid}")
        return uid
    if len(uids) == 1:
        return uids[0]
    volumes = [u for u in uids if not series_problem(folder, u)]
    if len(volumes) == 1:
        return volumes[0]
    raise VolumetricError(
        f"{name}: the folder holds {len(uids)} DICOM series ({', '.join(uids)}); volumetric-infer "
        "given the folder classifies each"
    )


def read_series(folder: Path, uid: str | None, name: str) -> tio.ScalarImage:
    """Series ``uid`` of ``folder`` (see `choose_series`) as TorchIO reads images: (C, W, H, D)
    float32 and the RAS affine. Refused with a VolumetricError naming ``name`` when it is not a 3D
    volume; a gap or uneven spacing is a warning."""
    uid = choose_series(folder, uid, name)
    files = series_files(folder, uid)
    try:
        slices = slice_headers(files)
    except RuntimeError as error:
        raise VolumetricError(
            f"{name}: cannot read DICOM series {uid}: a file is not a DICOM image "
            f"({first_line(error)})"
        ) from None
    problem = volume_problem(slices)
    if problem:
        raise VolumetricError(f"{name}: DICOM series {uid} is not a 3D volume: {problem}")
    uneven = spacing_problem(slices)
    if uneven:
        log.warning("%s: DICOM series %s: %s", name, uid, uneven)
    return _as_torchio(_read_files(files, uid, name))


def _read_files(files: list[Path], uid: str, name: str):
    """The files of one series as a SimpleITK image (pixel data read)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        with quiet_itk():
            return reader.Execute()
    except MemoryError:
        raise VolumetricError(f"{name}: too large to load into memory") from None
    except RuntimeError as error:
        raise VolumetricError(
            f"{name}: cannot read DICOM series {uid} ({first_line(error)})"
        ) from None


def _as_torchio(image) -> tio.ScalarImage:
    """A SimpleITK image as TorchIO's reader gives it (its voxel layout and RAS affine), with
    float32 voxels as the NIfTI reader gives them (volumetric/data/dataset.py): the same voxels
    read from DICOM or NIfTI are then the same tensor."""
    import torchio as tio

    data, affine = tio.io.sitk_to_nib(image, keepdim=True)  # (C, W, H, D), (4, 4) RAS
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return tio.ScalarImage(tensor=tensor, affine=affine)

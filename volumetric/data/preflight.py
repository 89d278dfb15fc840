"""Pre-flight: every scan is checked before the first training step, and the data set summarized.

Two passes, both parallel:

1. headers (threads): size, spacing, orientation and channels from each file's header, without
   its voxels. Refused here: files that are not images, 2D images, absurd sizes, and scans that
   would be smaller than one patch after resampling.
2. voxels (DataLoader workers): each scan that passed is read and preprocessed, which fills the
   disk cache on the way, so truncated files and NaN voxels are found now rather than at scan
   900 of epoch 1.

Every problem is one line naming the scan. With ``data.on_bad_scan: error`` the run stops after
listing them all; with ``skip`` those scans are left out and listed in the run folder.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from volumetric.data.cache import entry_bytes
from volumetric.data.dataset import ScanDataset, check_header
from volumetric.data.modality import scan_modality
from volumetric.data.source import ScanSource
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)


@dataclass
class Header:
    """What a scan's header says, before any voxel is read."""

    size: tuple[int, ...]  # voxels per axis, (W, H, D)
    spacing: tuple[float, ...]  # mm
    orientation: str  # axis codes, e.g. RAS or LPS
    channels: int


def read_header(scan: Path | ScanSource) -> Header | None:
    """What the headers of a scan's images say (the grid is the first image's): None when one of
    them is a folder, e.g. a DICOM series, or a header SimpleITK cannot parse (the voxel pass
    checks those); VolumetricError when a file is refused from its header."""
    readers = []
    for image in ScanSource.of(scan).images:
        reader = None if image.path.is_dir() else check_header(image.path, strict=False)
        if reader is None:  # SimpleITK cannot parse it: the voxel pass gives the reader's reason
            return None
        readers.append(reader)
    first = readers[0]
    return Header(
        size=tuple(first.GetSize()),
        spacing=tuple(round(s, 4) for s in first.GetSpacing()),
        orientation=_orientation(first.GetDirection()),
        channels=sum(reader.GetNumberOfComponents() for reader in readers),
    )


def _orientation(direction: tuple[float, ...]) -> str:
    """Axis codes (e.g. RAS, LPS) of a direction matrix; '?' when it is not a 3D one."""
    import SimpleITK as sitk

    try:
        return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(direction)
    except RuntimeError:
        return "?"


def resampled_size(header: Header, spacing: float | list[float] | None) -> tuple[int, ...]:
    """The scan's grid after resampling to ``spacing`` mm (as TorchIO's Resample rounds it)."""
    if spacing is None:
        return header.size[:3]
    target = [spacing] * 3 if isinstance(spacing, (int, float)) else spacing
    return tuple(
        max(1, round(n * s / t)) for n, s, t in zip(header.size[:3], header.spacing, target)
    )


class _VoxelCheck(Dataset):
    """Item i: {"index", "shape", "error"} after reading and preprocessing scan i (cached)."""

    def __init__(self, dataset: ScanDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        try:
            shape = list(self.dataset.subject(index).image.data.shape)
        except VolumetricError as error:
            return {"index": index, "shape": [], "error": str(error)}
        return {"index": index, "shape": shape, "error": ""}


@dataclass
class Preflight:
    """The outcome: what each scan's header says, its preprocessed shape, and its problem."""

    headers: dict[int, Header | None] = field(default_factory=dict)
    modalities: dict[int, str | None] = field(default_factory=dict)  # None: unknown (modality.py)
    shapes: dict[int, list[int]] = field(default_factory=dict)  # (C, W, H, D) after preprocessing
    problems: dict[int, str] = field(default_factory=dict)  # index → one-line message


def check_scans(
    dataset: ScanDataset,
    indices: list[int],
    *,
    patch_size: tuple[int, int, int],
    spacing: float | list[float] | None,
    workers: int,
    target_shape: list[int] | None = None,
) -> Preflight:
    """Both passes over ``indices`` of ``dataset``."""
    result = Preflight()
    paths = [dataset.items[i][0] for i in indices]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(_header_or_problem, paths))
        result.modalities.update(zip(indices, pool.map(scan_modality, paths)))
    for index, outcome in zip(indices, outcomes):
        if isinstance(outcome, str):
            result.problems[index] = outcome
            continue
        result.headers[index] = outcome
        problem = outcome and _too_small(outcome, dataset.items[index][0], patch_size, spacing)
        if problem:
            result.problems[index] = problem
    readable = [i for i in indices if i not in result.problems]
    if dataset.disk_cache is not None:
        check_cache_space(dataset, readable, result.headers, patch_size, spacing, target_shape)
    loader = DataLoader(
        _VoxelCheck(dataset, readable),
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator(),  # not the global RNG: the run's random streams stay put
    )
    for item in loader:
        if item["error"]:
            result.problems[item["index"]] = item["error"]
        else:
            result.shapes[item["index"]] = item["shape"]
    return result


def check_cache_space(
    dataset: ScanDataset,
    indices: list[int],
    headers: dict[int, Header | None],
    patch_size: tuple[int, int, int],
    spacing: float | list[float] | None,
    target_shape: list[int] | None,
) -> None:
    """Refuse, before writing anything, when the scans not cached yet would not fit on the cache's
    disk (estimated from their headers; folders without one count as the largest scan seen)."""
    cache = dataset.disk_cache
    assert cache is not None  # called only for a dataset with a disk cache
    sizes: list[int | None] = []
    for index in indices:
        if cache.entry(dataset.items[index][0]).exists():
            continue
        header = headers.get(index)
        if header is None:
            sizes.append(None)
            continue
        grid = target_shape or [
            -(-n // p) * p for n, p in zip(resampled_size(header, spacing), patch_size)
        ]
        sizes.append(entry_bytes((dataset.in_channels, *grid), cache.compact))
    known = [s for s in sizes if s is not None]
    needed = sum(known) + (len(sizes) - len(known)) * max(known, default=0)
    root = cache.root
    while not root.exists() and root != root.parent:
        root = root.parent
    free = shutil.disk_usage(root).free
    if needed > free:
        raise VolumetricError(
            f"the disk cache needs about {needed / 2**30:.1f} GiB for {len(sizes)} scans in "
            f"{cache.root}, but {free / 2**30:.1f} GiB are free there; free space, choose "
            "another --cache-dir, or set train.cache: none"
        )


def _header_or_problem(path: ScanSource) -> Header | None | str:
    try:
        return read_header(path)
    except VolumetricError as error:
        return str(error)


def _too_small(header: Header, path: ScanSource, patch: tuple[int, int, int], spacing) -> str:
    size = resampled_size(header, spacing)
    if sum(n > 1 for n in header.size[:3]) < 3 or len(header.size) < 3:
        return f"{path}: a {'×'.join(map(str, header.size))} image is not a 3D volume"
    if any(n < p for n, p in zip(size, patch)):
        return (
            f"{path}: scan is {'×'.join(map(str, size))} voxels after resampling, smaller than "
            f"one {'×'.join(map(str, patch))} patch"
        )
    return ""


def summarize(
    preflight: Preflight,
    items: list[tuple[ScanSource, int]],
    class_names: list[str],
    role: list[str],
) -> dict[str, Any]:
    """dataset_summary.json: scans per class and role, and the ranges of what headers say."""
    good = [i for i in range(len(items)) if i not in preflight.problems]
    headers = cast(
        "list[Header]", [preflight.headers[i] for i in good if preflight.headers.get(i) is not None]
    )
    per_class: dict[str, dict[str, int]] = {}
    for i in good:
        counts = per_class.setdefault(class_names[items[i][1]], {})
        counts[role[i]] = counts.get(role[i], 0) + 1
    return {
        "scans": len(items),
        "usable": len(good),
        "per_class": per_class,
        "size": _range([h.size[:3] for h in headers]),
        "spacing_mm": _range([h.spacing[:3] for h in headers]),
        "orientation": dict(Counter(h.orientation for h in headers)),
        "channels": dict(Counter(str(h.channels) for h in headers)),
        "modality": dict(Counter(preflight.modalities.get(i) or "unknown" for i in good)),
        "preprocessed_shape": _range([preflight.shapes[i] for i in good if i in preflight.shapes]),
        "unusable": {str(items[i][0]): preflight.problems[i] for i in sorted(preflight.problems)},
    }


def _range(values: list) -> dict[str, list] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    as_list = lambda a: [int(v) if float(v).is_integer() else float(v) for v in a]  # noqa: E731
    return {"min": as_list(array.min(axis=0)), "max": as_list(array.max(axis=0))}


def screen(
    dataset: ScanDataset,
    roles: list[str],
    class_names: list[str],
    *,
    policy: str,
    patch_size: tuple[int, int, int],
    spacing: float | list[float] | None,
    workers: int,
    target_shape: list[int] | None = None,
    rank: int = 0,
    size: int = 1,
    gather: Callable[[Preflight], list[Preflight]] = lambda mine: [mine],
) -> tuple[list[int], dict[str, Any]]:
    """Check every scan of ``dataset`` (each of ``size`` processes its share, merged by
    ``gather``); returns the indices to train on and the summary. ``policy`` error: any problem
    is a VolumetricError after all are listed (one scan: its own line); skip: they are left out."""
    share = list(range(rank, len(dataset), size))
    mine = check_scans(
        dataset,
        share,
        patch_size=patch_size,
        spacing=spacing,
        workers=workers,
        target_shape=target_shape,
    )
    merged = Preflight()
    for part in gather(mine):
        merged.headers.update(part.headers)
        merged.modalities.update(part.modalities)
        merged.shapes.update(part.shapes)
        merged.problems.update(part.problems)
    summary = summarize(merged, dataset.items, class_names, roles)
    bad = sorted(merged.problems)
    if bad and policy == "error":
        if len(bad) == 1:
            raise VolumetricError(merged.problems[bad[0]])
        for index in bad if rank == 0 else []:
            log.error("%s", merged.problems[index])
        raise VolumetricError(
            f"{len(bad)} of {len(dataset)} scans cannot be used (each listed above); fix or "
            "remove them, or set data.on_bad_scan: skip"
        )
    for index in bad if rank == 0 else []:
        log.warning("left out: %s", merged.problems[index])
    return [i for i in range(len(dataset)) if i not in merged.problems], summary

"""Relevance maps on disk: DIR/<scan name>_relevance.nii.gz and DIR/<scan name>_relevance.png.

The NIfTI file has the input scan's shape and affine (so it overlays the scan in any viewer); the
PNG is the montage of `volumetric.explain.montage`. A DICOM series picked out of a folder of
several is named after the folder and the end of its SeriesInstanceUID (``<folder>_<uid end>``),
so that the series of one folder get maps of their own. Two scans with the same name (from
different folders) get ``<name>_2``, ``<name>_3``, ... in the order they are given, with a warning.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from volumetric.atomic_files import atomic_write_bytes
from volumetric.data.discovery import SCAN_SUFFIXES
from volumetric.data.source import ScanSource
from volumetric.explain.montage import save_montage
from volumetric.explain.relevance import RelevanceMap

log = logging.getLogger(__name__)


UID_END = 8
"""Digits of a SeriesInstanceUID kept in a map's name: UIDs of one study share a long prefix and,
from some vendors, a constant suffix such as .0.0.0; their last 8 digits (dots dropped) usually
tell them apart (a clash left over gets the _2 of two scans of one name, with its warning)."""


def scan_name(scan: Path | ScanSource) -> str:
    """The file name without its scan extension (``a.nii.gz`` → ``a``); a DICOM folder's name as is,
    with the end of the series' UID when it is one of several (``study_12345678``); a scan of
    several images, its first one's."""
    source = ScanSource.of(scan)
    name = source.path.name
    if source.series_uid:
        return f"{name}_{source.series_uid.replace('.', '')[-UID_END:]}"
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def map_names(scans: list[Path] | list[ScanSource]) -> list[str]:
    """One unique base name per scan: its `scan_name`, with ``_2``, ``_3``, ... for repeats."""
    seen: Counter[str] = Counter()
    taken = {scan_name(s) for s in scans}
    names = []
    for scan in scans:
        base = scan_name(scan)
        seen[base] += 1
        name = base
        if seen[base] > 1:
            n = seen[base]
            while f"{base}_{n}" in taken:
                n += 1
            name = f"{base}_{n}"
            taken.add(name)
            log.warning(
                "%s: another scan is also named %s; its relevance maps are %s_relevance.*",
                scan,
                base,
                name,
            )
        names.append(name)
    return names


def save_relevance(
    relevance: RelevanceMap, directory: Path, name: str, class_name: str
) -> tuple[Path, Path]:
    """Write ``<name>_relevance.nii.gz`` and ``<name>_relevance.png`` into ``directory`` atomically."""
    directory = Path(directory)
    nifti_path, png_path = (
        directory / f"{name}_relevance.nii.gz",
        directory / f"{name}_relevance.png",
    )
    image = nib.Nifti1Image(relevance.data.astype(np.float32, copy=False), relevance.affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = f"volumetric grad x input, class {class_name}"[:79].encode(
        "ascii", "replace"
    )
    atomic_write_bytes(nifti_path, gzip.compress(image.to_bytes(), compresslevel=6))
    save_montage(
        png_path,
        relevance.scan,
        relevance.data,
        relevance.affine,
        title=f"{name}: relevance for {class_name} (gradient × input)",
    )
    return nifti_path, png_path

"""The modality of a scan (CT, MR, PT, ...), from what the files say about it.

In order: a manifest's ``modality`` column (the scan's `ScanSource.modality`); the DICOM Modality
tag (0008,0060) of a DICOM series; the ``Modality`` of a BIDS-style JSON sidecar beside a file
(``sub-01_T1w.nii.gz`` → ``sub-01_T1w.json``, BIDS writes "MR"); else unknown (None). Training
records the modalities of its scans in the checkpoint, and inference refuses a scan of another
known modality (volumetric/inference.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from volumetric.data.dicom import series_headers
from volumetric.data.source import ScanSource
from volumetric.errors import VolumetricError

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def sidecar(path: Path) -> Path:
    """The JSON file of the same name beside ``path``."""
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def scan_modality(source: ScanSource) -> str | None:
    """The modality of the scan's first image (upper case), or None when nothing says it."""
    if source.modality:
        return source.modality.strip().upper()
    image = source.images[0]
    if image.path.is_dir():
        try:
            headers = series_headers(image.path, image.series_uid, str(source))
        except VolumetricError:
            return None  # reading it says what is wrong with it
        return next((h.modality for h in headers if h.modality), None)
    side = sidecar(image.path)
    if side.is_file():
        try:
            value = json.loads(side.read_text(encoding="utf-8")).get("Modality")
        except (OSError, ValueError, AttributeError):
            return None
        return str(value).strip().upper() or None if value else None
    return None

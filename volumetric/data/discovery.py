"""Discovery: a data set is a folder of class sub-folders or a CSV manifest.

    root/<class>/**/<scan>             one sub-folder per class, scans found recursively
    manifest.csv                       one row per scan: path,label[,group]; relative paths resolve
                                       against the CSV's folder

Any format SimpleITK reads counts as a scan: NIfTI, NRRD, MetaImage, and DICOM series: a folder
holding DICOM files, whatever they are called (IM0001, ... as PACS exports them), gives one scan
per series that is a 3D volume; localizers and other series that are not are left out with a
warning (volumetric/data/dicom.py).

A manifest's columns:

- ``path``: the scan. With ``data.channels: [t1, t2, flair]`` the columns named there instead,
  one image per channel (volumetric/data/source.py).
- ``label``: its class; may be left out (or left empty) where the truth is unknown: inference.
- ``group``: optional, e.g. a patient id: the automatic validation split keeps each group whole.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from volumetric.data.dicom import series_problem, series_uids
from volumetric.data.source import Entry, ImageRef, ScanSource
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_scan_file(path: Path) -> bool:
    return (
        path.is_file()
        and path.name.lower().endswith(SCAN_SUFFIXES)
        and not path.name.startswith(".")
    )


def find_scans(inputs: Sequence[str | Path]) -> list[ScanSource]:
    """Scans named directly, or found recursively in folders (sorted, without duplicates).

    A file named is a scan, whatever it holds (reading it says what is amiss). A folder is
    searched, itself included: scan files, and one scan per DICOM series (`dicom_scans`); series
    that are not 3D volumes are left out with a warning, unless nothing else is found in a folder
    named: then they are its scans, and reading each says why it cannot be used."""
    scans: list[ScanSource] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise VolumetricError(f"{item}: no such file or folder")
        scans += [ScanSource.of(item)] if item.is_file() else _named_folder(item)
    return list(dict.fromkeys(scans))


def _named_folder(folder: Path) -> list[ScanSource]:
    """A folder's scans; its non-volume series are warned about and left out, unless they are all
    it holds."""
    found, refused = search_folder(folder)
    if not found:
        return [source for source, _ in refused]
    for source, problem in refused:
        log.warning("%s: %s; left out", source.path, problem)
    return found


def search_folder(folder: Path) -> tuple[list[ScanSource], list[tuple[ScanSource, str]]]:
    """The scans in ``folder`` and its sub-folders (hidden ones skipped), in path order, and the
    DICOM series that are not 3D volumes with why."""
    found: list[ScanSource] = []
    refused: list[tuple[ScanSource, str]] = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if is_scan_file(path):
            found.append(ScanSource.of(path))
        elif path.is_dir() and _may_hold_dicom(path):
            volumes, others = dicom_scans(path)
            found += volumes
            refused += others
    return found, refused


def _may_hold_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds files other than known scan files: only those can be DICOM, and
    only such folders are worth GDCM's look at every file's header."""
    return any(
        p.is_file() and not p.name.startswith(".") and not is_scan_file(p) for p in folder.iterdir()
    )


def dicom_scans(folder: Path) -> tuple[list[ScanSource], list[tuple[ScanSource, str]]]:
    """One scan per DICOM series in ``folder`` (which series: its SeriesInstanceUID, given only
    when the folder holds several, so that a folder of one series is just the folder), split into
    3D volumes and the series that are not, with why (volumetric/data/dicom.py)."""
    uids = series_uids(folder)
    volumes, refused = [], []
    for uid in uids:
        source = ScanSource.of(ImageRef(folder, uid if len(uids) > 1 else None))
        problem = series_problem(folder, uid)
        if problem:
            refused.append((source, f"DICOM series {uid} is not a 3D volume: {problem}"))
        else:
            volumes.append(source)
    return volumes, refused


@dataclass(frozen=True)
class Unusable:
    """An input named for inference that gives no scan to classify (a missing path, a folder
    without scans), and why: it gets an error row of its own in the predictions."""

    source: ScanSource
    error: str


def inference_inputs(
    inputs: Sequence[str | Path], *, channels: Sequence[str] | None = None
) -> list[ScanSource | Unusable]:
    """The scans to classify, in the order of ``inputs``: a .csv input is a manifest (its label
    column optional, its image columns ``channels``), anything else a scan or a folder searched for
    scans. Every input gives at least one item: its scans, or an `Unusable` saying why there are
    none."""
    items: list[ScanSource | Unusable] = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv" and item.is_file():
            entries = read_manifest(item, channels=channels, labelled=False)
            items += [entry.source for entry in entries]
        elif not item.exists():
            items.append(Unusable(ScanSource.of(item), f"{item}: no such file or folder"))
        else:
            items += find_scans([item]) or [Unusable(ScanSource.of(item), _no_scans(item))]
    return list(dict.fromkeys(items))


def _no_scans(folder: Path) -> str:
    suffixes = ", ".join(SCAN_SUFFIXES)
    return f"{folder}: no scans found in this folder (scan files {suffixes}, or DICOM series)"


def discover(
    source: str | Path, *, channels: Sequence[str] | None = None, labelled: bool = True
) -> list[Entry]:
    """The scans of a class-folder tree or a CSV manifest. ``channels``: the manifest's image
    columns (default: ``path``); ``labelled=False`` accepts a manifest without labels."""
    source = Path(source)
    if not source.exists():
        raise VolumetricError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise VolumetricError(
                f"{source}: a data set is a folder of class sub-folders or a .csv manifest"
            )
        return read_manifest(source, channels=channels, labelled=labelled)
    if channels and len(channels) > 1:
        raise VolumetricError(
            f"{source}: data.channels {list(channels)} name manifest columns; give a .csv "
            "manifest with those columns rather than a folder"
        )
    items = []
    for class_dir in sorted(
        p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        items += [Entry(scan, class_dir.name) for scan in find_scans([class_dir])]
    if not items:
        raise VolumetricError(f"{source}: no scans found (expected {source}/<class>/<scan>.nii.gz)")
    return items


def read_manifest(
    path: Path, *, channels: Sequence[str] | None = None, labelled: bool = True
) -> list[Entry]:
    """The rows of a manifest as entries; every problem is a VolumetricError naming its line."""
    columns = list(channels or ["path"])
    rows = _manifest_rows(path, [*columns, *(["label"] if labelled else [])])
    items, seen = [], set()
    for line, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip() or None
        if labelled and label is None:
            raise VolumetricError(f"{path}:{line}: empty label")
        modality = (row.get("modality") or "").strip() or None
        source = ScanSource.channels([_image_path(path, line, row, c) for c in columns], modality)
        key = tuple(p.path.resolve() for p in source.images)
        if key in seen:
            raise VolumetricError(f"{path}:{line}: scan {source} is listed twice")
        seen.add(key)
        items.append(Entry(source, label, (row.get("group") or "").strip() or None))
    return items


def _manifest_rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    try:
        # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise VolumetricError(f"{path}: cannot read manifest ({error})") from None
    missing = [c for c in required if not rows or c not in rows[0]]
    if missing:
        raise VolumetricError(
            f"{path}: a manifest needs a header with the column(s) {','.join(required)} and at "
            f"least one row (missing: {','.join(missing)})"
        )
    return rows


def _image_path(manifest: Path, line: int, row: dict[str, str], column: str) -> Path:
    value = (row.get(column) or "").strip()
    if not value:
        raise VolumetricError(f"{manifest}:{line}: empty {column}")
    image = Path(value) if Path(value).is_absolute() else manifest.parent / value
    if not image.exists():
        raise VolumetricError(f"{manifest}:{line}: {column} {value} does not exist")
    return image


def class_indices(
    items: list[Entry], class_names: list[str], source: str | Path
) -> list[tuple[ScanSource, int]]:
    """Map class names to indices of ``class_names``; a label outside them is a VolumetricError."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({item.label for item in items} - set(index), key=str)
    if unknown:
        raise VolumetricError(
            f"{source}: label(s) {unknown} are not among the model's classes {class_names}"
        )
    # every label is a class name here (None is among the unknown)
    return [(item.source, index[cast(str, item.label)]) for item in items]

"""Discovery: a data set is a folder of class sub-folders or a CSV manifest.

    root/<class>/**/<scan>             one sub-folder per class, scans found recursively
    manifest.csv                       one row per scan: path,label[,group]; relative paths resolve
                                       against the CSV's folder

Any format SimpleITK reads counts as a scan: NIfTI, NRRD, MetaImage, and a folder holding a DICOM
series (its files make up one scan).

A manifest's columns:

- ``path``: the scan. With ``data.channels: [t1, t2, flair]`` the columns named there instead,
  one image per channel (volumetric/data/source.py).
- ``label``: its class; may be left out (or left empty) where the truth is unknown: inference.
- ``group``: optional, e.g. a patient id: the automatic validation split keeps each group whole.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from volumetric.data.source import Entry, ScanSource
from volumetric.errors import VolumetricError

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_scan_file(path: Path) -> bool:
    return (
        path.is_file()
        and path.name.lower().endswith(SCAN_SUFFIXES)
        and not path.name.startswith(".")
    )


def is_dicom_series(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def find_scans(inputs: Sequence[str | Path]) -> list[ScanSource]:
    """Scans named directly, or found recursively in folders (sorted, without duplicates)."""
    scans: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise VolumetricError(f"{item}: no such file or folder")
        if item.is_file() or is_dicom_series(item):
            scans.append(item)
            continue
        for path in sorted(item.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(item).parts):
                continue
            if is_scan_file(path) or is_dicom_series(path):
                scans.append(path)
    return [ScanSource.of(path) for path in dict.fromkeys(scans)]


def inference_inputs(
    inputs: Sequence[str | Path], *, channels: Sequence[str] | None = None
) -> list[ScanSource]:
    """The scans to classify: a .csv input is a manifest (its label column optional, its image
    columns ``channels``), anything else a scan or a folder searched for scans."""
    scans: list[ScanSource] = []
    for item in inputs:
        if Path(item).suffix.lower() == ".csv" and Path(item).is_file():
            scans += [
                entry.source
                for entry in read_manifest(Path(item), channels=channels, labelled=False)
            ]
        else:
            scans += find_scans([item])
    return list(dict.fromkeys(scans))


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
        source = ScanSource.channels([_image_path(path, line, row, c) for c in columns])
        key = tuple(p.path.resolve() for p in source.images)
        if key in seen:
            raise VolumetricError(f"{path}:{line}: scan {source} is listed twice")
        seen.add(key)
        items.append(Entry(source, label, (row.get("group") or "").strip() or None))
    return items


def _manifest_rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
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
    return [(item.source, index[item.label]) for item in items]

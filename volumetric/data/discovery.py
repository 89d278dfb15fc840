"""Discovery: a data set is a folder of class sub-folders or a CSV manifest of ``path,label``.

    root/<class>/**/*.nii.gz           one sub-folder per class, scans found recursively
    manifest.csv                       path,label rows; relative paths resolve against the CSV's folder

Any format SimpleITK reads counts as a scan: NIfTI, NRRD, MetaImage, and a folder holding a DICOM
series (its .dcm files make up one scan).
"""

from __future__ import annotations

import csv
from pathlib import Path

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


def find_scans(inputs: list[str | Path]) -> list[Path]:
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
    return list(dict.fromkeys(scans))


def discover(source: str | Path) -> list[tuple[Path, str]]:
    """(scan path, class name) pairs from a class-folder tree or a CSV manifest."""
    source = Path(source)
    if not source.exists():
        raise VolumetricError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise VolumetricError(
                f"{source}: a data set is a folder of class sub-folders or a .csv manifest"
            )
        return _read_manifest(source)
    items = []
    for class_dir in sorted(
        p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        items += [(scan, class_dir.name) for scan in find_scans([class_dir])]
    if not items:
        raise VolumetricError(f"{source}: no scans found (expected {source}/<class>/<scan>.nii.gz)")
    return items


def _read_manifest(path: Path) -> list[tuple[Path, str]]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise VolumetricError(f"{path}: cannot read manifest ({error})") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise VolumetricError(
            f"{path}: a manifest needs a header with the columns path,label and at least one row"
        )
    items, seen = [], set()
    for line, row in enumerate(rows, start=2):
        scan, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not scan or not label:
            raise VolumetricError(f"{path}:{line}: empty path or label")
        scan_path = Path(scan) if Path(scan).is_absolute() else path.parent / scan
        if not scan_path.exists():
            raise VolumetricError(f"{path}:{line}: scan {scan} does not exist")
        if scan_path.resolve() in seen:
            raise VolumetricError(f"{path}:{line}: scan {scan} is listed twice")
        seen.add(scan_path.resolve())
        items.append((scan_path, label))
    return items


def class_indices(
    items: list[tuple[Path, str]], class_names: list[str], source: str | Path
) -> list[tuple[Path, int]]:
    """Map class names to indices of ``class_names``; a label outside them is a VolumetricError."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label in items} - set(index))
    if unknown:
        raise VolumetricError(
            f"{source}: label(s) {unknown} are not among the model's classes {class_names}"
        )
    return [(path, index[label]) for path, label in items]

"""Data discovery (class folders, CSV manifests) and class indices (the split: test_split.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_scan

from volumetric.data.discovery import class_indices, discover, find_scans
from volumetric.data.source import Entry, ScanSource
from volumetric.errors import VolumetricError


def touch_scan(path: Path) -> Path:
    return write_scan(path, np.zeros((2, 2, 2)))


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    touch_scan(root / "b_lesion" / "z.nii.gz")
    touch_scan(root / "b_lesion" / "a.nii")
    touch_scan(root / "b_lesion" / "site2" / "deep" / "m.nii.gz")  # found recursively
    touch_scan(root / "a_healthy" / "x.nii")
    touch_scan(root / "a_healthy" / ".hidden.nii.gz")  # hidden file: skipped
    touch_scan(root / "a_healthy" / ".cache" / "y.nii.gz")  # inside a hidden folder: skipped
    touch_scan(root / ".trash" / "w.nii.gz")  # hidden class folder: skipped
    (root / "a_healthy" / "notes.txt").write_text("not a scan")
    (root / "a_healthy" / "scan.nii.gz.bak").write_text("not a scan")
    (root / "README.md").write_text("a file at the top level is not a class")
    return root


def test_class_folder_discovery(class_tree):
    items = discover(class_tree)
    relative = [(str(e.source.path.relative_to(class_tree)), e.label) for e in items]
    assert relative == [
        ("a_healthy/x.nii", "a_healthy"),
        ("b_lesion/a.nii", "b_lesion"),
        ("b_lesion/site2/deep/m.nii.gz", "b_lesion"),
        ("b_lesion/z.nii.gz", "b_lesion"),
    ]
    assert all(e.source.path.is_file() and e.group is None for e in items)


def test_discovery_is_sorted_regardless_of_creation_order(tmp_path):
    root = tmp_path / "d"
    for name in ["c", "a", "b"]:
        touch_scan(root / "cls" / f"{name}.nii")
    touch_scan(root / "other" / "x.nii")
    paths = [e.source.path.name for e in discover(root)]
    assert paths == ["a.nii", "b.nii", "c.nii", "x.nii"]


def test_discovery_errors(tmp_path):
    with pytest.raises(VolumetricError, match="no such"):
        discover(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(VolumetricError, match="no scans"):
        discover(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VolumetricError, match="csv"):
        discover(tmp_path / "file.txt")


def test_find_scans_files_and_folders(class_tree):
    single = class_tree / "a_healthy" / "x.nii"
    found = find_scans([single, class_tree / "b_lesion", single])
    assert found[0] == ScanSource.of(single)
    assert len(found) == 4  # duplicates dropped
    assert [s.path.name for s in found[1:]] == ["a.nii", "m.nii.gz", "z.nii.gz"]
    with pytest.raises(VolumetricError, match="no such"):
        find_scans([class_tree / "nope.nii"])


def test_find_scans_dicom_series_by_content_not_suffix(tmp_path):
    """A folder is a DICOM series when GDCM finds one in its files' headers (real series:
    tests/data/test_dicom.py), not when its files end in .dcm."""
    fake = tmp_path / "root" / "patient1"
    fake.mkdir(parents=True)
    for i in range(3):
        (fake / f"slice{i}.dcm").write_bytes(b"not DICOM")
    assert find_scans([tmp_path / "root"]) == []


# ------------------------------------------------------------------------------------------ manifest


def write_manifest(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_manifest_relative_and_absolute_paths(tmp_path):
    a = touch_scan(tmp_path / "meta" / "scans" / "a.nii.gz")
    b = touch_scan(tmp_path / "elsewhere" / "b.nii")
    manifest = write_manifest(
        tmp_path / "meta" / "list.csv", f"path,label,age\nscans/a.nii.gz,healthy,3\n{b},lesion,4\n"
    )
    items = discover(manifest)
    assert items == [
        Entry(ScanSource.of(tmp_path / "meta" / "scans" / "a.nii.gz"), "healthy"),
        Entry(ScanSource.of(b), "lesion"),
    ]
    assert items[0].source.path.resolve() == a.resolve()


def test_csv_relative_paths_resolve_against_csv_folder_not_cwd(tmp_path, monkeypatch):
    touch_scan(tmp_path / "meta" / "a.nii")
    touch_scan(tmp_path / "cwd" / "a.nii")  # a decoy beside the working directory
    manifest = write_manifest(tmp_path / "meta" / "list.csv", "path,label\na.nii,x\n")
    monkeypatch.chdir(tmp_path / "cwd")
    ((source, label, _),) = discover(manifest)
    assert source.path.resolve() == (tmp_path / "meta" / "a.nii").resolve()
    assert label == "x"


def test_csv_missing_path_raises(tmp_path):
    touch_scan(tmp_path / "a.nii")
    manifest = write_manifest(tmp_path / "m.csv", "path,label\na.nii,x\nmissing.nii,y\n")
    with pytest.raises(VolumetricError, match=r"m\.csv:3.*missing\.nii"):
        discover(manifest)


def test_csv_duplicate_row_raises(tmp_path):
    touch_scan(tmp_path / "sub" / "a.nii")
    manifest = write_manifest(
        tmp_path / "m.csv", f"path,label\nsub/a.nii,x\n{tmp_path / 'sub' / 'a.nii'},x\n"
    )
    with pytest.raises(VolumetricError, match="twice"):
        discover(manifest)


@pytest.mark.parametrize(
    "text", ["file,label\na.nii,x\n", "path,class\na.nii,x\n", "path\na.nii\n", "path,label\n", ""]
)
def test_csv_missing_columns_or_rows_raises(tmp_path, text):
    touch_scan(tmp_path / "a.nii")
    with pytest.raises(VolumetricError, match="path,label"):
        discover(write_manifest(tmp_path / "m.csv", text))


def test_csv_empty_label_raises(tmp_path):
    touch_scan(tmp_path / "a.nii")
    with pytest.raises(VolumetricError, match="empty"):
        discover(write_manifest(tmp_path / "m.csv", "path,label\na.nii,\n"))


def test_class_indices():
    a, b = ScanSource.of("a"), ScanSource.of("b")
    items = [Entry(a, "lesion"), Entry(b, "healthy")]
    assert class_indices(items, ["healthy", "lesion"], "src") == [(a, 1), (b, 0)]
    with pytest.raises(VolumetricError, match="tumour"):
        class_indices([Entry(a, "tumour")], ["healthy", "lesion"], "src")

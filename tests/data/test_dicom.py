"""DICOM series as hospital archives export them: found by content (files IM0001, ... without a
suffix), one scan per series of a folder, localizers and other non-volumes left out (or refused
when named alone), uneven slice spacing warned about, and every input of volumetric-infer a row.

The series are real DICOM files written by SimpleITK (one file per slice, int16, with the tags a
scanner writes: modality, study and series UIDs, position, orientation, instance number, spacing).
"""

from __future__ import annotations

import locale
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torchio as tio
from conftest import read_csv, write_scan

from volumetric.cli import infer_main
from volumetric.data.cache import DiskCache, scan_files
from volumetric.data.dataset import read_scan
from volumetric.data.discovery import find_scans, inference_inputs
from volumetric.data.loading import LoadingOptions
from volumetric.data.source import ImageRef, ScanSource
from volumetric.errors import VolumetricError
from volumetric.evaluation.evaluate import evaluate_checkpoint
from volumetric.explain.save import map_names
from volumetric.inference import Predictor

CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "checkpoint_v1" / "best.pt"
STUDY = "1.2.826.0.1.3680043.8.498.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # columns: row, column, slice normal


def voxels(seed: int, shape=(16, 16, 12)) -> np.ndarray:
    """Integer intensities (W, H, D), which int16 DICOM holds exactly."""
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)


def as_sitk(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # (W, H, D) → SimpleITK's (D, H, W)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def write_series(
    folder: Path,
    array: np.ndarray,
    uid: str,
    *,
    spacing=(1.5, 1.5, 2.0),
    origin=(-12.0, 20.0, 5.0),
    direction=AXIAL,
    names: str = "IM{:04d}",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    positions: list[tuple[float, float, float]] | None = None,
    orientations: list[tuple[float, ...]] | None = None,
    modality: str = "MR",
    description: str = "",
) -> sitk.Image:
    """One DICOM file per slice of ``array`` (W, H, D) into ``folder``, named ``names`` (no suffix
    by default), as SimpleITK's "DICOM series from array" example writes them; ``positions`` and
    ``orientations`` override the slices' geometry. Returns the volume as a SimpleITK image."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = as_sitk(array, spacing, origin, direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the file names say nothing of the format
    with kept_locale():
        for k in range(volume.GetDepth()):
            position = (
                positions[k] if positions else volume.TransformIndexToPhysicalPoint((0, 0, k))
            )
            d = orientations[k] if orientations else direction
            tags = {
                "0008|0060": modality,
                "0008|103e": description,
                "0008|0008": image_type,
                "0020|000d": STUDY,
                "0020|000e": uid,
                "0008|0018": f"{uid}.{k + 1}",
                "0020|0032": "\\".join(map(str, position)),
                "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))),
                "0020|0013": str(k + 1),
                "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                "0018|0050": str(spacing[2]),
            }
            image = volume[:, :, k]
            for tag, value in tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / names.format(k + 1)))
            writer.Execute(image)
    return volume


@contextmanager
def kept_locale():
    """GDCM's writer leaves the process locale at "C" (ASCII) after writing decimal strings, which
    would make every later text file of the test session ASCII-only: put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def ras_affine(image: sitk.Image) -> np.ndarray:
    return tio.io.get_ras_affine_from_sitk(image)


# ------------------------------------------------------------------------------------ discovery


def test_series_without_suffix_is_found_by_content_and_named(tmp_path):
    """(a) IM0001, IM0002, ... without .dcm: found in a search and readable when named; read as
    TorchIO reads the folder: the same voxels and RAS affine (coronal slices: not a diagonal one)."""
    patient = tmp_path / "archive" / "patient1"
    array = voxels(0)
    volume = write_series(patient, array, "1.2.3.10", direction=CORONAL)
    assert sorted(p.name for p in patient.iterdir())[:2] == ["IM0001", "IM0002"]
    assert find_scans([tmp_path / "archive"]) == [ScanSource.of(patient)]
    assert find_scans([patient]) == [ScanSource.of(patient)]  # series_uid None: one series
    image = read_scan(patient)
    assert np.array_equal(image.data[0].numpy(), array)
    reference = tio.ScalarImage(patient)  # TorchIO's own reader of a DICOM folder
    reference.load()
    assert np.allclose(image.affine, reference.affine, atol=1e-6)
    assert np.allclose(image.affine, ras_affine(volume), atol=1e-6)
    assert np.array_equal(image.data.numpy(), reference.data.numpy())


def test_plain_scan_folders_are_not_read_by_gdcm(tmp_path, monkeypatch):
    """Only folders holding files that are not known scan files get GDCM's look."""
    import volumetric.data.discovery as discovery

    write_scan(tmp_path / "data" / "a.nii.gz", np.zeros((4, 4, 4)))
    looked = []
    monkeypatch.setattr(discovery, "series_uids", lambda folder: looked.append(folder) or ())
    assert [s.path.name for s in find_scans([tmp_path / "data"])] == ["a.nii.gz"]
    assert looked == []
    (tmp_path / "data" / "notes.txt").write_text("not a scan")
    find_scans([tmp_path / "data"])
    assert looked == [tmp_path / "data"]


def test_folder_of_two_series_gives_a_scan_each(tmp_path, caplog):
    """(b) Two volume series in one folder: two scans with their UIDs, each read from (and cached
    by) its own files only; their relevance maps get names of their own, without a clash."""
    study = tmp_path / "study"
    write_series(study, voxels(1), "1.2.3.21", names="A{:04d}")
    write_series(study, voxels(2), "1.2.3.22", names="B{:04d}")
    scans = find_scans([tmp_path])
    assert scans == [
        ScanSource.of(ImageRef(study, "1.2.3.21")),
        ScanSource.of(ImageRef(study, "1.2.3.22")),
    ]
    first, second = (s.images[0] for s in scans)
    assert {p.name[0] for p in scan_files(first)} == {"A"} and len(scan_files(first)) == 12
    assert {p.name[0] for p in scan_files(second)} == {"B"}
    assert np.array_equal(read_scan(scans[0]).data[0].numpy(), voxels(1))
    assert np.array_equal(read_scan(scans[1]).data[0].numpy(), voxels(2))
    cache = DiskCache.for_preprocessing(tmp_path / "c", {"spacing": None}, 1)
    before = [cache.entry(s) for s in scans]
    assert before[0] != before[1]
    (study / "A0003").write_bytes((study / "A0003").read_bytes())  # the first series changes
    assert cache.entry(scans[0]) != before[0] and cache.entry(scans[1]) == before[1]
    with caplog.at_level(logging.WARNING):
        names = map_names(scans)
    assert names == ["study_12321", "study_12322"] and "also named" not in caplog.text


def test_localizer_beside_a_volume_is_left_out_with_a_warning(tmp_path, caplog):
    """(c) A one-slice localizer in the folder of a volume: left out of a search, with a warning
    naming the folder, the series and why."""
    study = tmp_path / "study"
    write_series(study, voxels(3), "1.2.3.31")
    write_series(
        study,
        voxels(4)[:, :, :1],
        "1.2.3.32",
        names="LOC{:04d}",
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
    )
    with caplog.at_level(logging.WARNING):
        assert find_scans([tmp_path]) == [ScanSource.of(ImageRef(study, "1.2.3.31"))]
    (warning,) = [r.getMessage() for r in caplog.records if "1.2.3.32" in r.getMessage()]
    assert str(study) in warning and "localizer" in warning and "left out" in warning
    # named without a series (e.g. in a manifest), the folder is its only volume
    assert np.array_equal(read_scan(study).data[0].numpy(), voxels(3))


def _one_slice(folder: Path) -> None:
    write_series(folder, voxels(5)[:, :, :1], "1.2.3.41")


def _two_slices(folder: Path) -> None:
    write_series(folder, voxels(5)[:, :, :2], "1.2.3.42")


def _mixed_orientations(folder: Path) -> None:
    write_series(
        folder, voxels(5)[:, :, :4], "1.2.3.43", orientations=[AXIAL, AXIAL, CORONAL, AXIAL]
    )


def _two_volumes_interleaved(folder: Path) -> None:  # e.g. two echoes at each position
    positions = [(0.0, 0.0, float(z)) for z in (0, 0, 2, 2, 4, 4)]
    write_series(folder, voxels(5)[:, :, :6], "1.2.3.44", positions=positions)


@pytest.mark.parametrize(
    "write,fragment",
    [
        (_one_slice, "1 slice(s), fewer than 3"),
        (_two_slices, "2 slice(s), fewer than 3"),
        (_mixed_orientations, "orientation differs"),
        (_two_volumes_interleaved, "6 slices at 3 positions"),
    ],
)
def test_series_that_are_not_volumes(tmp_path, caplog, write, fragment):
    """Left out of a search with a warning; named alone, an error naming the folder and why."""
    (tmp_path / "archive").mkdir()
    write_scan(tmp_path / "archive" / "other.nii.gz", np.zeros((8, 8, 8)))
    folder = tmp_path / "archive" / "series"
    write(folder)
    with caplog.at_level(logging.WARNING):
        assert [s.path.name for s in find_scans([tmp_path / "archive"])] == ["other.nii.gz"]
    assert fragment in caplog.text and str(folder) in caplog.text
    assert find_scans([folder]) == [ScanSource.of(folder)]  # named: a scan, read to say why
    with pytest.raises(VolumetricError, match="not a 3D volume") as raised:
        read_scan(folder)
    assert str(raised.value).startswith(f"{folder}: DICOM series 1.2.3.4")
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "steps,fragment",
    [
        ([2.0] * 5 + [6.0] + [2.0] * 5, "a gap of 6 mm between slices 2 mm apart"),
        ([2.0] * 6 + [2.5] * 5, "non-uniform slice spacing (2 to 2.5 mm)"),
    ],
)
def test_uneven_slice_spacing_is_a_warning(tmp_path, caplog, steps, fragment):
    """(f) Gaps and uneven spacing: read, with a warning naming the scan and its series."""
    heights = np.concatenate([[5.0], 5.0 + np.cumsum(steps)])
    folder = tmp_path / "uneven"
    write_series(folder, voxels(6), "1.2.3.51", positions=[(-12.0, 20.0, z) for z in heights])
    with caplog.at_level(logging.WARNING):
        assert read_scan(folder).shape == (1, 16, 16, 12)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{folder}: DICOM series 1.2.3.51: ") and fragment in warning
    caplog.clear()
    write_series(tmp_path / "even", voxels(6), "1.2.3.52")
    with caplog.at_level(logging.WARNING):
        read_scan(tmp_path / "even")
    assert not caplog.records


# ------------------------------------------------------------------------------------ inference


def infer(inputs: list[Path], output: Path, *extra: str) -> int:
    args = [str(CHECKPOINT), *map(str, inputs), "--output", str(output), "--no-progress"]
    return infer_main([*args, *extra])


def test_two_series_get_two_rows_and_two_maps(tmp_path):
    """(b) on the command line: a row per series, with its UID; a map per series."""
    study = tmp_path / "study"
    write_series(study, voxels(1), "1.2.3.21", names="A{:04d}")
    write_series(study, voxels(2), "1.2.3.22", names="B{:04d}")
    output, maps = tmp_path / "p.csv", tmp_path / "maps"
    assert infer([study], output, "--maps", str(maps), "--map-steps", "1") == 0
    header, rows = read_csv(output)
    assert header[:3] == ["path", "series_uid", "prediction"]
    assert [(r["path"], r["series_uid"], r["error"]) for r in rows] == [
        (str(study), "1.2.3.21", ""),
        (str(study), "1.2.3.22", ""),
    ]
    assert all(r["prediction"] in ("healthy", "lesion") for r in rows)
    assert sorted(p.name for p in maps.iterdir()) == [
        f"study_{n}_relevance.{ext}" for n in ("12321", "12322") for ext in ("nii.gz", "png")
    ]


def test_named_folder_of_a_localizer_is_an_error_row(tmp_path):
    """(c) on the command line: the folder's only series is a localizer → its error row."""
    scout = tmp_path / "scout"
    write_series(scout, voxels(4)[:, :, :1], "1.2.3.32", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    good = write_scan(tmp_path / "good.nii.gz", voxels(7).astype(np.float32))
    output = tmp_path / "p.csv"
    assert infer([good, scout], output) == 1
    _, rows = read_csv(output)
    assert [r["path"] for r in rows] == [str(good), str(scout)]
    assert rows[0]["error"] == "" and rows[1]["prediction"] == "" and rows[1]["series_uid"] == ""
    assert rows[1]["error"] == (
        f"{scout}: DICOM series 1.2.3.32 is not a 3D volume: a localizer (ImageType LOCALIZER)"
    )


def test_every_input_gets_a_row(tmp_path, capsys):
    """(e) Five inputs, five rows in their order: a DICOM folder and a NIfTI file classified; a
    stray single DICOM slice, a text file and a folder without scans each an error row."""
    series = tmp_path / "series"
    write_series(series, voxels(8), "1.2.3.61")
    nifti = write_scan(tmp_path / "scan.nii.gz", voxels(9).astype(np.float32))
    write_series(tmp_path / "loose", voxels(10)[:, :, :1], "1.2.3.62")
    stray = tmp_path / "IM0003"
    shutil.move(tmp_path / "loose" / "IM0001", stray)
    text = tmp_path / "notes.txt"
    text.write_text("not a scan\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    inputs = [series, nifti, stray, text, empty]
    assert len(inference_inputs(inputs)) == 5
    output = tmp_path / "p.csv"
    assert infer(inputs, output) == 1
    _, rows = read_csv(output)
    assert [r["path"] for r in rows] == list(map(str, inputs))
    assert [bool(r["prediction"]) for r in rows] == [True, True, False, False, False]
    assert "16×16×1 image is not a 3D volume" in rows[2]["error"]
    assert rows[3]["error"].startswith(f"{text}: cannot read scan")
    assert rows[4]["error"].startswith(f"{empty}: no scans found")
    assert f"wrote 5 rows to {output} (3 failed)" in capsys.readouterr().out


def test_missing_input_is_an_error_row(tmp_path):
    output = tmp_path / "p.csv"
    assert infer([tmp_path / "typo.nii.gz"], output) == 1
    _, rows = read_csv(output)
    assert rows[0]["error"] == f"{tmp_path / 'typo.nii.gz'}: no such file or folder"


def test_evaluation_rows_name_the_series(tmp_path):
    """volumetric-evaluate's predictions.csv has the series_uid column too."""
    write_series(tmp_path / "data" / "healthy" / "study", voxels(11), "1.2.3.71", names="A{:04d}")
    write_series(tmp_path / "data" / "healthy" / "study", voxels(12), "1.2.3.72", names="B{:04d}")
    write_scan(tmp_path / "data" / "lesion" / "x.nii.gz", voxels(13).astype(np.float32))
    out = tmp_path / "eval"
    evaluate_checkpoint(
        CHECKPOINT,
        tmp_path / "data",
        out,
        device="cpu",
        loading=LoadingOptions(cache="none", num_workers=0, progress=False),
        bootstrap_resamples=20,
    )
    header, rows = read_csv(out / "predictions.csv")
    assert header[:3] == ["path", "series_uid", "label"]
    assert [(Path(r["path"]).name, r["series_uid"], r["label"]) for r in rows] == [
        ("study", "1.2.3.71", "healthy"),
        ("study", "1.2.3.72", "healthy"),
        ("x.nii.gz", "", "lesion"),
    ]


def test_dicom_and_nifti_of_the_same_voxels_give_the_same_probabilities(trained_run, tmp_path):
    """(d) The same integer voxels and geometry, as a DICOM series and as NIfTI: the same tensor,
    hence the same probabilities from a trained model."""
    rng = np.random.default_rng(14)
    array = rng.normal(100.0, 10.0, size=(20, 18, 16))
    array[4:10, 6:12, 3:9] += 80.0  # a bright cube, as the tiny data set's lesions
    array = np.round(array).astype(np.int16)
    volume = write_series(tmp_path / "dicom", array, "1.2.3.81", direction=CORONAL)
    affine = ras_affine(volume)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(nifti))
    from_dicom, from_nifti = read_scan(tmp_path / "dicom"), read_scan(nifti)
    assert np.allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
    assert np.array_equal(from_dicom.data.numpy(), from_nifti.data.numpy())
    predictor = Predictor(trained_run / "best.pt", device="cpu")
    dicom_probs = predictor(tmp_path / "dicom").probs
    assert np.allclose(dicom_probs, predictor(nifti).probs, rtol=0, atol=1e-6)

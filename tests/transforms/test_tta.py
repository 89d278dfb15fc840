"""Test-time augmentation (`volumetric-infer --tta N`): columns, statistics, repeatability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import read_csv, write_scan

from volumetric.checkpoint import save_checkpoint
from volumetric.cli import infer_main
from volumetric.errors import VolumetricError
from volumetric.inference import Predictor
from volumetric.models.vit3d import VolumeTransformer
from volumetric.transforms.tta import build_tta

HEADER = ["path", "series_uid", "prediction", "prob_healthy", "prob_lesion", "error"]
TTA_HEADER = [
    "path",
    "series_uid",
    "prediction",
    "prob_healthy",
    "prob_lesion",
    "prob_std_healthy",
    "prob_std_lesion",
    "error",
]
MODEL_ARGS = dict(num_classes=2, patch_size=4, embed_dim=24, depth=1, num_heads=2)
PREPROCESSING = {
    "spacing": None,
    "target_shape": [16, 16, 16],
    "intensity": "zscore",
    "ct_window": [-1000.0, 1000.0],
    "canonical": True,
    "patch_size": 4,
}
AUGMENT = [
    {"RandomFlip": {"axes": [0, 1]}},
    {"RandomAffine": {"scales": 0.1, "degrees": 10}},
    {"RandomNoise": {}},
]


@pytest.fixture
def setup(tmp_path):
    """A checkpoint trained (as its config says) with flips, affine and noise, whose random weights are
    scaled so that its probabilities move visibly under augmentation; two asymmetric scans, one broken."""
    torch.manual_seed(0)
    model = VolumeTransformer(**MODEL_ARGS)
    with torch.no_grad():
        model.head.weight.mul_(10.0)
    checkpoint = tmp_path / "c.pt"
    save_checkpoint(
        checkpoint,
        model=model,
        model_args=MODEL_ARGS,
        class_names=["healthy", "lesion"],
        preprocessing=PREPROCESSING,
        config={"augment": AUGMENT},
    )
    rng = np.random.default_rng(0)
    for name, shape in (("a", (16, 16, 16)), ("b", (18, 14, 16))):
        data = rng.normal(100, 10, shape)
        data[2:7, 9:14, 3:9] += 80  # off-centre: a flip moves it
        write_scan(tmp_path / "scans" / f"{name}.nii.gz", data)
    (tmp_path / "scans" / "broken.nii.gz").write_text("not a scan")
    return checkpoint, tmp_path / "scans"


def infer(checkpoint: Path, inputs: list[Path], output: Path, *options: str) -> int:
    return infer_main(
        [str(checkpoint), *map(str, inputs), "--output", str(output), "--no-progress", *options]
    )


def test_tta_columns_and_statistics(setup, tmp_path):
    """prob_<class> are means (summing to 1, the prediction their argmax), prob_std_<class> are >= 0 and
    not all 0; a broken scan still gets its row, with every value column empty, and exit status 1."""
    checkpoint, scans = setup
    assert infer(checkpoint, [scans], tmp_path / "p.csv", "--tta", "4", "--seed", "3") == 1
    header, rows = read_csv(tmp_path / "p.csv")
    assert header == TTA_HEADER
    by_name = {Path(r["path"]).name: r for r in rows}
    broken = by_name.pop("broken.nii.gz")
    assert broken["error"] and all(broken[c] == "" for c in TTA_HEADER[1:-1])
    assert len(by_name) == 2
    stds = []
    for row in by_name.values():
        assert row["error"] == ""
        probs = {c: float(row[f"prob_{c}"]) for c in ("healthy", "lesion")}
        assert sum(probs.values()) == pytest.approx(1.0, abs=2e-6)
        assert row["prediction"] == max(probs, key=probs.get)
        stds += [float(row["prob_std_healthy"]), float(row["prob_std_lesion"])]
        assert stds[-1] == pytest.approx(stds[-2], abs=2e-6)  # two classes: p and 1 − p vary alike
    assert min(stds) >= 0 and max(stds) > 1e-3


def test_tta_mean_includes_the_plain_pass(setup, tmp_path):
    """With one augmented pass, mean = (p₀ + p₁)/2 and the sample std = |p₀ − p₁|/√2, so the plain
    pass p₀ (the CSV without --tta) lies std/√2 from the mean."""
    checkpoint, scans = setup
    scan = scans / "b.nii.gz"
    assert infer(checkpoint, [scan], tmp_path / "plain.csv") == 0
    assert infer(checkpoint, [scan], tmp_path / "tta.csv", "--tta", "1", "--seed", "1") == 0
    plain, tta = read_csv(tmp_path / "plain.csv")[1][0], read_csv(tmp_path / "tta.csv")[1][0]
    for c in ("healthy", "lesion"):
        distance = abs(float(tta[f"prob_{c}"]) - float(plain[f"prob_{c}"]))
        assert distance == pytest.approx(float(tta[f"prob_std_{c}"]) / np.sqrt(2), abs=5e-6)
    assert float(tta["prob_std_lesion"]) > 0  # seed 1 draws a view that differs from the scan


def test_tta_is_repeatable(setup, tmp_path):
    """Same seed, same CSV; another seed, other numbers; a scan gets the same views alone or in a batch."""
    checkpoint, scans = setup
    ok = [scans / "a.nii.gz", scans / "b.nii.gz"]
    for name in ("1.csv", "2.csv"):
        assert infer(checkpoint, ok, tmp_path / name, "--tta", "3", "--seed", "7") == 0
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
    assert infer(checkpoint, ok, tmp_path / "other.csv", "--tta", "3", "--seed", "8") == 0
    assert (tmp_path / "other.csv").read_bytes() != (tmp_path / "1.csv").read_bytes()
    assert infer(checkpoint, [ok[1]], tmp_path / "alone.csv", "--tta", "3", "--seed", "7") == 0
    assert read_csv(tmp_path / "alone.csv")[1][0] == read_csv(tmp_path / "1.csv")[1][1]


def test_without_tta_the_csv_is_unchanged(setup, tmp_path):
    checkpoint, scans = setup
    assert infer(checkpoint, [scans], tmp_path / "none.csv") == 1
    assert infer(checkpoint, [scans], tmp_path / "zero.csv", "--tta", "0", "--seed", "5") == 1
    header, rows = read_csv(tmp_path / "none.csv")
    assert header == HEADER and len(rows) == 3
    assert (tmp_path / "none.csv").read_bytes() == (tmp_path / "zero.csv").read_bytes()


def test_tta_leaves_the_global_rng_alone(setup):
    checkpoint, scans = setup
    predictor = Predictor(checkpoint, device="cpu", tta=2, seed=4)
    torch.manual_seed(123)
    predictor(scans / "a.nii.gz")
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_negative_tta_is_a_user_error(setup, tmp_path, capsys):
    checkpoint, scans = setup
    assert infer(checkpoint, [scans], tmp_path / "p.csv", "--tta", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("volumetric-infer: error: --tta -1")
    assert not (tmp_path / "p.csv").exists()


def test_views_follow_the_training_augmentation():
    """Flips and affine as trained, intensity transforms left out; nothing added that was not trained."""
    trained = build_tta(AUGMENT + [{"RandomGamma": {}}])
    assert [type(t) for t in trained.transforms] == [tio.RandomFlip, tio.RandomAffine]
    assert trained.transforms[0].axes == (0, 1)
    affine_only = build_tta([{"RandomAffine": {"degrees": 5}}])
    assert [type(t) for t in affine_only.transforms] == [tio.RandomAffine]
    for untrained in (None, [], [{"RandomNoise": {}}]):  # e.g. a left-vs-right task: no flip
        with pytest.raises(VolumetricError, match="trained with neither; run without --tta"):
            build_tta(untrained)


def test_tta_of_a_model_trained_without_spatial_augmentation_is_a_user_error(
    setup, tmp_path, capsys
):
    """One line, exit 2, no CSV: the model has no label-preserving views to average over."""
    _, scans = setup
    unflipped = tmp_path / "unflipped.pt"
    save_checkpoint(
        unflipped,
        model=VolumeTransformer(**MODEL_ARGS),
        model_args=MODEL_ARGS,
        class_names=["left", "right"],
        preprocessing=PREPROCESSING,
        config={"augment": [{"RandomNoise": {}}]},
    )
    code = infer(unflipped, [scans], tmp_path / "p.csv", "--tta", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "trained with neither; run without --tta" in err[0]
    assert not (tmp_path / "p.csv").exists()


def test_tta_with_maps_explains_the_rows_prediction(setup, tmp_path):
    """--tta and --maps together: every readable scan gets its map, for the class its row names."""
    import nibabel as nib

    checkpoint, scans = setup
    maps = tmp_path / "maps"
    assert (
        infer(
            checkpoint,
            [scans],
            tmp_path / "p.csv",
            "--tta",
            "2",
            "--maps",
            str(maps),
            "--map-steps",
            "2",
        )
        == 1
    )
    header, rows = read_csv(tmp_path / "p.csv")
    assert header == TTA_HEADER
    assert sorted(p.name for p in maps.iterdir()) == [
        "a_relevance.nii.gz",
        "a_relevance.png",
        "b_relevance.nii.gz",
        "b_relevance.png",
    ]
    for row in rows:
        if not row["error"]:
            name = Path(row["path"]).name.removesuffix(".nii.gz")
            description = (
                nib.load(str(maps / f"{name}_relevance.nii.gz")).header["descrip"].item().decode()
            )
            assert description.endswith(f"class {row['prediction']}")

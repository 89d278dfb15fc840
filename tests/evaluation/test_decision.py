"""Operating points and calibration (volumetric/evaluation/decision.py, calibration.py): thresholds
fitted on known scores, temperature scaling, ECE and Brier on known inputs, and a training run
that fits them into its checkpoint, which inference and evaluation then follow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, assert_one_line_error, read_csv, train, write_config

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import evaluate_main, infer_main
from volumetric.config import config_from_dict
from volumetric.errors import VolumetricError
from volumetric.evaluation.calibration import brier_score, reliability
from volumetric.evaluation.decision import Decision, fit_temperature, fit_threshold
from volumetric.evaluation.metrics import evaluation_report, operating_point

# ten scans: positives score 0.9 0.8 0.7 0.6 0.55, negatives 0.65 0.4 0.3 0.2 0.1
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.65, 0.4, 0.3, 0.2, 0.1])
TRUTH = np.array([True] * 5 + [False] * 5)


@pytest.mark.parametrize(
    "rule, threshold",
    [
        ("argmax", None),
        # sensitivity + specificity − 1: 1 + 0.8 − 1 at 0.55, the most (0.6 at 0.4, 0.6 and 0.7)
        ("youden", 0.55),
        ("sensitivity=0.95", 0.55),  # all five positives: the highest such threshold
        ("sensitivity=0.8", 0.6),
        ("specificity=0.95", 0.7),  # no negative at or above 0.7: the lowest such threshold
        ("specificity=0.8", 0.55),  # one negative (0.65) above: the lowest such threshold
    ],
)
def test_thresholds_on_known_scores(rule, threshold):
    assert fit_threshold(SCORES, TRUTH, rule) == threshold


def test_a_specificity_no_threshold_reaches_lies_above_every_score():
    scores, truth = np.array([0.9, 0.8]), np.array([False, True])  # a negative scores highest
    t = fit_threshold(scores, truth, "specificity=1.0")
    assert t > 0.9 and fit_threshold(scores, truth, "sensitivity=1.0") == 0.8


def test_threshold_needs_both_kinds_and_a_valid_rule():
    with pytest.raises(VolumetricError, match="one kind only"):
        fit_threshold(SCORES, np.ones(10, bool), "youden")
    for bad in ("youden2", "sensitivity=1.5", "sensitivity", "recall=0.9"):
        with pytest.raises(VolumetricError, match="train.threshold"):
            config_from_dict({"train": {"threshold": bad}})


def test_the_decision_predicts_by_its_threshold():
    probs = np.stack([1 - SCORES, SCORES], axis=1)  # (10, 2), class 1 positive
    assert Decision().predict(probs).tolist() == (SCORES >= 0.5).astype(int).tolist()
    at = Decision(positive=1, threshold=0.4, rule="sensitivity=0.95").predict(probs)
    assert at.tolist() == (SCORES >= 0.4).astype(int).tolist()
    # the positive class first: its probability is column 0
    flipped = Decision(positive=0, threshold=0.4).predict(probs[:, ::-1])
    assert flipped.tolist() == (SCORES < 0.4).astype(int).tolist()
    rates = operating_point(at, TRUTH.astype(int), positive=1)
    assert rates == {"sensitivity": 1.0, "specificity": 0.6, "ppv": 5 / 7, "npv": 1.0}


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3))
    logits[np.arange(400), labels] += 1.0  # right more often than not
    probs = torch.as_tensor(logits * 4.0).softmax(1).numpy()  # four times too confident

    def nll(p):
        return -np.log(p[np.arange(400), labels]).mean()

    t = fit_temperature(probs, labels)
    scaled = torch.as_tensor(np.log(probs) / t).softmax(1).numpy()
    assert 2.5 < t < 6.0 and nll(scaled) < nll(probs) - 0.1
    assert (scaled.argmax(1) == probs.argmax(1)).all()  # the ranking stays
    assert fit_temperature(scaled, labels) == pytest.approx(1.0, abs=0.05)


def test_ece_and_brier_on_known_inputs():
    # four scans at confidence 0.8, three right: gap |0.8 − 0.75|; two at 0.6, one right: |0.6 − 0.5|
    probs = np.array([[0.8, 0.2]] * 4 + [[0.4, 0.6]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 0])
    result = reliability(probs, labels, bins=10)
    assert result["ece"] == pytest.approx((4 * 0.05 + 2 * 0.1) / 6)
    filled = [b for b in result["bins"] if b["scans"]]
    assert [(b["scans"], b["confidence"], b["accuracy"]) for b in filled] == [
        (2, pytest.approx(0.6), 0.5),
        (4, pytest.approx(0.8), 0.75),
    ]
    # binary Brier of the positive class's probability: (0.2² · 3 + 0.8² + 0.4² + 0.6²) / 6
    assert brier_score(probs, labels) == pytest.approx((3 * 0.04 + 0.64 + 0.16 + 0.36) / 6)
    three = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert brier_score(three, np.array([0, 2])) == pytest.approx(0.25)  # (0 + 0.25 + 0.25) / 2


def test_metrics_follow_the_decision():
    probs = np.stack([1 - SCORES, SCORES], axis=1)
    labels = TRUTH.astype(int)
    plain = evaluation_report(probs, labels, ["no", "yes"], bootstrap_resamples=50)
    sensitive = evaluation_report(
        probs,
        labels,
        ["no", "yes"],
        bootstrap_resamples=50,
        decision=Decision(positive=1, threshold=0.4, rule="sensitivity=0.95"),
    )
    assert plain["operating_point"]["specificity"] == 0.8 and plain["accuracy"] == 0.9
    assert plain["confusion_matrix"]["matrix"] == [[4, 1], [0, 5]]
    point = sensitive["operating_point"]
    assert point["sensitivity"] == 1.0 and point["specificity"] == 0.6 and point["threshold"] == 0.4
    assert sensitive["accuracy"] == 0.8 and sensitive["confusion_matrix"]["matrix"] == [
        [3, 2],
        [0, 5],
    ]
    low, high = point["specificity_ci95"]
    assert 0.0 <= low <= 0.6 <= high <= 1.0
    assert sensitive["auroc"] == plain["auroc"] and sensitive["pr_auc"] == plain["pr_auc"]
    assert math.isclose(
        plain["per_class"]["yes"]["pr_auc"],
        plain["pr_auc"] * 2 - plain["per_class"]["no"]["pr_auc"],
    )


@pytest.mark.slow  # trains, evaluates and infers
def test_a_run_fits_its_operating_point_and_inference_follows_it(tiny_dataset_shared, tmp_path):
    config = {
        **TINY_CONFIG,
        "train": {
            **TINY_CONFIG["train"],
            "positive_class": "lesion",
            "threshold": "sensitivity=0.95",
            "calibrate": True,
        },
    }
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, write_config(tmp_path / "c.yaml", config)) == 0
    decision = load_checkpoint(run / "best.pt").decision
    assert decision["rule"] == "sensitivity=0.95" and decision["positive"] == 1
    assert decision["threshold"] is not None and decision["temperature"] > 0
    assert load_checkpoint(run / "last.pt").decision == decision
    scan = sorted((tiny_dataset_shared / "healthy").iterdir())[:4]
    output = tmp_path / "p.csv"
    assert (
        infer_main(
            [str(run / "best.pt"), *map(str, scan), "--output", str(output), "--no-progress"]
        )
        == 0
    )
    for row in read_csv(output)[1]:
        positive = float(row["prob_lesion"]) >= decision["threshold"]
        assert row["prediction"] == ("lesion" if positive else "healthy")
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                str(run / "best.pt"),
                str(tiny_dataset_shared),
                "--output-dir",
                str(out),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["operating_point"]["threshold"] == decision["threshold"]
    assert metrics["temperature"] == decision["temperature"]


def test_decision_settings_are_checked_against_the_data(tiny_dataset_shared, tmp_path, capsys):
    config = {**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "positive_class": "tumour"}}
    assert (
        train(tiny_dataset_shared, tmp_path / "a", write_config(tmp_path / "a.yaml", config)) == 2
    )
    assert_one_line_error(capsys, "volumetric-train", "train.positive_class='tumour'")
    config = {
        **TINY_CONFIG,
        "train": {**TINY_CONFIG["train"], "threshold": "youden", "val_fraction": 0.0},
    }
    assert (
        train(tiny_dataset_shared, tmp_path / "b", write_config(tmp_path / "b.yaml", config)) == 2
    )
    assert_one_line_error(capsys, "volumetric-train", "fitted on validation scans")

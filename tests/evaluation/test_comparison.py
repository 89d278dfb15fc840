"""Comparing two models on the same scans (volumetric/evaluation/comparison.py): paired bootstrap,
McNemar, verdict, mean ± sd, reading predictions; on constructed examples."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from volumetric.evaluation import comparison as compare


def binomial_two_sided(b: int, c: int) -> float:
    """Exact two-sided binomial test of b successes in b + c trials at p = 1/2, computed the other
    way round: the total probability of every outcome no more likely than the observed one."""
    n = b + c
    pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[b] * (1 + 1e-12)))


# -------------------------------------------------------------------------------- mean ± sd


def test_format_mean_sd_uses_the_sample_standard_deviation():
    assert compare.format_mean_sd([0.90, 0.92, 0.91]) == "0.910 ± 0.010"  # n - 1 in the denominator
    assert compare.format_mean_sd([0.9, 0.8], digits=2) == "0.85 ± 0.07"  # sd = 0.0707
    assert compare.mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))


def test_format_mean_sd_with_one_or_no_value():
    assert compare.format_mean_sd([0.9104]) == "0.910"  # one seed: no deviation to show
    assert compare.mean_sd([0.5]) == (0.5, None)
    assert compare.format_mean_sd([]) == "n/a"
    assert compare.format_mean_sd([None, math.nan]) == "n/a"  # undefined AUROCs are left out
    assert compare.format_mean_sd([0.8, None]) == "0.800"


# ---------------------------------------------------------------------------------- McNemar


def test_mcnemar_on_a_known_table():
    # 1 scan only A got right, 9 only B: 2 (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert compare.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert compare.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)  # symmetric
    assert compare.mcnemar_exact(0, 0) == 1.0  # no discordant scans: no evidence
    assert compare.mcnemar_exact(5, 5) == 1.0  # capped at 1


@pytest.mark.parametrize("b, c", [(0, 6), (3, 12), (21, 24), (40, 70), (0, 1), (250, 310)])
def test_mcnemar_matches_the_exact_binomial_test(b, c):
    assert compare.mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c), rel=1e-9)


def test_discordant_counts():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 1, 0, 0], bool)
    assert compare.discordant(a, b) == (2, 1)


# ------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_on_a_constructed_example():
    # 200 scans: A right on all, B wrong on 20 → +10 points; the scans' differences are 20 ones and
    # 180 zeros, so the bootstrap interval is about 0.10 ± 1.96 sqrt(0.1 · 0.9 / 200) = ±0.042
    a = np.ones(200, bool)
    b = np.ones(200, bool)
    b[::10] = False
    result = compare.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert result["difference"] == pytest.approx(0.10)
    assert result["low"] == pytest.approx(0.10 - 0.042, abs=0.012)
    assert result["high"] == pytest.approx(0.10 + 0.042, abs=0.012)
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert (result["scans"], result["pairs"], result["resamples"]) == (200, 1, 2000)
    assert compare.paired_bootstrap(a, b, resamples=2000, seed=0) == result  # seeded
    swapped = compare.paired_bootstrap(b, a, resamples=2000, seed=0)
    assert swapped["difference"] == pytest.approx(-0.10)
    assert swapped["high"] < 0


def test_paired_bootstrap_of_identical_predictions_is_zero():
    a = np.random.default_rng(1).random(100) > 0.3
    result = compare.paired_bootstrap(a, a.copy())
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)


def test_pooled_bootstrap_resamples_scans_keeping_their_seed_pairs():
    # Two seed pairs that disagree scan by scan but cancel out on every scan: pooled, each scan's
    # difference is 0, so the interval is exactly [0, 0]. Resampling pairs independently would not.
    a = np.array([[1, 0, 1, 0] * 25, [0, 1, 0, 1] * 25], bool)
    b = np.array([[0, 1, 0, 1] * 25, [1, 0, 1, 0] * 25], bool)
    pooled = compare.paired_bootstrap(a, b, resamples=500)
    assert (pooled["difference"], pooled["low"], pooled["high"]) == (0.0, 0.0, 0.0)
    assert pooled["pairs"] == 2 and pooled["scans"] == 100
    one = compare.paired_bootstrap(a[0], b[0], resamples=500)
    assert one["low"] < 0 < one["high"]


def test_paired_bootstrap_refuses_unpaired_shapes():
    with pytest.raises(ValueError):
        compare.paired_bootstrap(np.ones(5, bool), np.ones(6, bool))


# --------------------------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    "low, expected",
    [
        (3.0, "non-inferior"),
        (0.0, "non-inferior"),
        (-1.9, "non-inferior"),
        (-2.0, "inconclusive"),  # the bound must lie above the margin, not on it
        (-2.1, "inconclusive"),
        (-15.0, "inconclusive"),
        (math.nan, "inconclusive"),
    ],
)
def test_verdict_thresholds(low, expected):
    assert compare.verdict(low) == expected


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (
            -3.5,
            -1.2,
            "inconclusive",
        ),  # reaches into the margin: a loss under 2 points not ruled out
        (-62.0, -58.0, "inferior"),
        (-4.0, -2.0, "inconclusive"),  # on the margin is not below it
        (-1.0, 1.0, "non-inferior"),
    ],
)
def test_verdict_from_the_whole_interval(low, high, expected):
    assert compare.verdict(low, high_points=high) == expected


def test_verdict_with_another_margin():
    assert compare.verdict(-2.5, margin_points=3.0) == "non-inferior"
    assert compare.verdict(-0.5, margin_points=0.5) == "inconclusive"


def test_verdict_sentence():
    base = {"scans": 1000, "pairs": 3}
    good = compare.verdict_sentence({**base, "difference": -0.004, "low": -0.016, "high": 0.008})
    assert good.startswith("**Verdict: non-inferior.**")
    assert "0.4 points below" in good and "-1.6 to +0.8" in good and "3 seed pairs" in good
    bad = compare.verdict_sentence({**base, "difference": -0.01, "low": -0.031, "high": 0.011})
    assert bad.startswith("**Verdict: inconclusive.**") and "cannot rule out" in bad
    worse = compare.verdict_sentence({**base, "difference": -0.6, "low": -0.62, "high": -0.58})
    assert worse.startswith("**Verdict: inferior.**") and "loses more than 2 points" in worse


# ------------------------------------------------------------------ predictions and the section


def write_predictions(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "prediction", "prob_a", "prob_b"])
        for scan, label, prediction in rows:
            p = 0.9 if prediction == "a" else 0.1
            writer.writerow([scan, label, prediction, f"{p:.6f}", f"{1 - p:.6f}"])
    return path


def test_read_correct_and_match_by_path(tmp_path):
    first = write_predictions(
        tmp_path / "1.csv", [("s1", "a", "a"), ("s2", "b", "a"), ("s3", "b", "b")]
    )
    second = write_predictions(  # same scans, another order
        tmp_path / "2.csv", [("s3", "b", "a"), ("s1", "a", "a"), ("s2", "b", "b")]
    )
    one, two = compare.read_correct(first), compare.read_correct(second)
    assert one == {"s1": True, "s2": False, "s3": True}
    a, b = compare.match_scans([one], [two])
    assert a.tolist() == [[True, False, True]] and b.tolist() == [[True, True, False]]
    other = write_predictions(tmp_path / "3.csv", [("s1", "a", "a"), ("s4", "b", "b")])
    with pytest.raises(ValueError, match="different scans"):
        compare.match_scans([one], [compare.read_correct(other)])


def test_read_correct_refuses_a_table_without_labels(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,prediction,prob_a\ns1,a,0.9\n")
    with pytest.raises(ValueError, match="label"):
        compare.read_correct(path)

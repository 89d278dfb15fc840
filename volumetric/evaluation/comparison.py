"""Comparing two models on the same scans: accuracy differences with a paired bootstrap interval,
McNemar's exact test, a non-inferiority verdict against a margin, and mean ± sd over seeds.

Used by scripts/compare.py (the accuracy studies of docs/results.md) and usable on any two
predictions.csv of `volumetric-evaluate` on one test set: `read_correct` each, `match_scans`,
then `paired_bootstrap`, `discordant` and `mcnemar_exact`, and `verdict` on the interval.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MARGIN_POINTS = 2.0  # non-inferiority margin, points of accuracy
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    if not values:
        raise ValueError("mean_sd of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def format_mean_sd(values: Sequence[float | None], digits: int = 3) -> str:
    """ "0.912 ± 0.008" over seeds; one value alone; "n/a" when there is none (undefined values,
    None or NaN, are left out)."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return "n/a"
    mean, sd = mean_sd(known)
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> dict[str, float]:
    """Accuracy of A minus accuracy of B on the same scans, with a percentile bootstrap interval.

    ``correct_a``, ``correct_b``: (N,) or (S, N) booleans, whether each of N scans was classified
    correctly, row s of A paired with row s of B (e.g. the same seed). The difference is the mean
    over scans and pairs; the bootstrap draws N scans with replacement, each keeping its S pairs
    (scans are the unit that varies). Seeded with its own generator. Returns difference, low and
    high as fractions (multiply by 100 for points), and the settings used.
    """
    a, b = np.atleast_2d(correct_a).astype(float), np.atleast_2d(correct_b).astype(float)
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(
            f"paired_bootstrap needs two equal, non-empty shapes: {a.shape}, {b.shape}"
        )
    per_scan = (a - b).mean(axis=0)  # (N,) each scan's difference, averaged over the pairs
    rng = np.random.default_rng(seed)
    n = len(per_scan)
    values = np.empty(resamples)
    chunk = max(1, 2**22 // n)  # resamples per step, so that the index matrix stays small
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        values[start:stop] = per_scan[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return {
        "difference": float(per_scan.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "scans": n,
        "pairs": a.shape[0],
    }


def discordant(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int]:
    """(scans only A got right, scans only B got right) of two (N,) boolean arrays."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the p-value of the discordant counts under "either model is
    as likely to be the one that is right", i.e. twice the smaller tail of Binomial(n, 1/2),
    n = only_a + only_b, capped at 1 (1 when there are no discordant scans)."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts cannot be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until this one division


def verdict(
    low_points: float, margin_points: float = MARGIN_POINTS, high_points: float = math.inf
) -> str:
    """Non-inferiority against a margin, from the interval [low, high] (points of A - B):
    "non-inferior" when its lower bound lies above -margin, "inferior" when its upper bound lies
    below -margin (a loss larger than the margin is shown), else "inconclusive"."""
    if low_points > -margin_points:
        return "non-inferior"
    return "inferior" if high_points < -margin_points else "inconclusive"


def verdict_sentence(
    result: dict[str, float],
    margin_points: float = MARGIN_POINTS,
    names: tuple[str, str] = ("seq-norm", "softmax"),
) -> str:
    """A plain-language reading of a pooled ``paired_bootstrap`` result of A minus B, ``names``
    (A, B) as the text calls them."""
    a, b = names
    diff, low, high = (100 * result[k] for k in ("difference", "low", "high"))
    word = verdict(low, margin_points, high)
    pairs = result["pairs"]
    over = f"pooled over {pairs} seed pairs" if pairs > 1 else "on one seed pair"
    side = "above" if diff >= 0 else "below"
    start = (
        f"**Verdict: {word}.** {over[0].upper() + over[1:]} and {result['scans']} test scans, "
        f"{a}'s test accuracy is {abs(diff):.1f} points {side} {b}'s "
        f"(95% interval {low:+.1f} to {high:+.1f} points). "
    )
    if word == "non-inferior":
        end = (
            f"The interval's lower end lies above the {-margin_points:.0f}-point margin: on this task "
            f"{a} comes within {margin_points:.0f} points of {b}'s accuracy or does better"
        )
        end += " (the whole interval lies above 0: here it does better)." if low > 0 else "."
    elif word == "inferior":
        end = (
            f"The whole interval lies below the {-margin_points:.0f}-point margin: on this task "
            f"{a} loses more than {margin_points:.0f} points against {b}."
        )
    else:
        end = (
            f"The interval's lower end lies below the {-margin_points:.0f}-point margin: these runs "
            f"cannot rule out that {a} loses more than {margin_points:.0f} points against "
            f"{b} (which is not the same as showing that it does)."
        )
    return start + end


def read_correct(path: Path) -> dict[str, bool]:
    """{scan path: classified correctly} from a predictions.csv of volumetric-evaluate (columns
    path, label, prediction, prob_<class>...). A row without a prediction counts as wrong."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label", "prediction"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)}")
        correct: dict[str, bool] = {}
        for row in reader:
            if row["path"] in correct:
                raise ValueError(f"{path}: scan {row['path']} is listed twice")
            correct[row["path"]] = bool(row["prediction"]) and row["prediction"] == row["label"]
    return correct


def match_scans(
    runs_a: Sequence[dict[str, bool]], runs_b: Sequence[dict[str, bool]]
) -> tuple[np.ndarray, np.ndarray]:
    """Pair ``read_correct`` tables (runs_a[s] with runs_b[s]) → two (S, N) boolean arrays, column
    j the same scan everywhere (matched by path). All tables must hold the same scans."""
    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError("match_scans needs as many runs of A as of B, at least one")
    scans = sorted(runs_a[0])
    for table in (*runs_a, *runs_b):
        if set(table) != set(scans):
            raise ValueError(
                f"the runs were evaluated on different scans ({len(set(table) ^ set(scans))} "
                "differ): re-run them on one test set"
            )
    return (
        np.array([[t[s] for s in scans] for t in runs_a], dtype=bool),
        np.array([[t[s] for s in scans] for t in runs_b], dtype=bool),
    )

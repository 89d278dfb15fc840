"""Prediction rows: the one place that turns class probabilities into the columns of a CSV.

``volumetric-infer`` and ``volumetric-evaluate`` both write tables of this shape:

    path, series_uid[, label], prediction, prob_<class>...[, prob_std_<class>...][, error]

``series_uid`` is the SeriesInstanceUID of a DICOM series picked out of a folder of several (the
scans of one folder share its ``path``), empty for every other scan; ``label`` when the truth is known (evaluation), ``prob_std_`` with test-time augmentation,
``error`` where a scan may fail without stopping the others (inference). Probabilities are
written with six decimals; the prediction is the class the model's operating point names (its
`Decision`: the highest probability, the first such class on a tie, unless a threshold was
fitted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumetric.data.source import ScanSource
from volumetric.evaluation.decision import ARGMAX, Decision


@dataclass(frozen=True)
class PredictionTable:
    """Header and rows of a predictions CSV for ``class_names`` (see the module docstring)."""

    class_names: Sequence[str]
    labelled: bool = False
    with_std: bool = False
    with_error: bool = False
    decision: Decision = ARGMAX

    def header(self) -> list[str]:
        names = self.class_names
        return [
            "path",
            "series_uid",
            *(["label"] if self.labelled else []),
            "prediction",
            *(f"prob_{name}" for name in names),
            *((f"prob_std_{name}" for name in names) if self.with_std else ()),
            *(["error"] if self.with_error else []),
        ]

    def row(
        self,
        path: str | Path | ScanSource,
        probs: Sequence[float] = (),
        *,
        label: int | None = None,
        probs_std: Sequence[float] = (),
        error: str = "",
    ) -> list[str]:
        """One row; a failed scan (``error``) has empty prediction and probability cells."""
        names = self.class_names
        scan = (
            [str(path.path), path.series_uid] if isinstance(path, ScanSource) else [str(path), ""]
        )
        truth = [names[label] if label is not None else ""] if self.labelled else []
        if error:
            empty = [""] * (len(names) * (2 if self.with_std else 1))
            return [*scan, *truth, "", *empty, *([error] if self.with_error else [])]
        std = [f"{s:.6f}" for s in probs_std] if self.with_std else []
        return [
            *scan,
            *truth,
            names[int(self.decision.predict(np.asarray([probs]))[0])],
            *(f"{p:.6f}" for p in probs),
            *std,
            *([""] if self.with_error else []),
        ]

"""Ensembles: several checkpoints of one task classify as one model, their probabilities averaged.

An ensemble is given as several checkpoints, or as the folder of a cross-validation run
(`volumetric-train --folds K`, volumetric/engine/folds.py), whose ``folds.json`` names its members
(``fold-k/best.pt``) and the operating point fitted on their out-of-fold predictions. Members must
agree on what they classify and how a scan is prepared: the same class names in the same order,
the same preprocessing and the same input channels; any difference is one error line naming it
and the two files.

Each member's probabilities are taken after its own temperature (a calibrated member stays
calibrated), then averaged; the ensemble's spread (the CSV's ``prob_std_`` columns) is the
standard deviation over members, and over members × test-time views with ``--tta``. The
prediction follows the folds run's operating point, or the arg max for checkpoints given one by
one (their own thresholds, fitted on other validation scans, are not combined).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from volumetric.checkpoint import Checkpoint
from volumetric.errors import VolumetricError
from volumetric.evaluation.decision import ARGMAX, Decision

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"


class MeanOfMembers(nn.Module):
    """The members as one model: (B, C, W, H, D) → log of the mean of the members' probabilities,
    so that a softmax of the output gives that mean back (and a cross-entropy its likelihood)."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float | None]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperatures = [t or 1.0 for t in temperatures]

    def member_probs(self, volume: Tensor) -> Tensor:
        """(M, B, num_classes): each member's probabilities, after its own temperature."""
        return torch.stack(
            [
                (m(volume).float() / t).softmax(dim=1)
                for m, t in zip(self.members, self.temperatures)
            ]
        )

    def forward(self, volume: Tensor) -> Tensor:
        return self.member_probs(volume).mean(dim=0).clamp_min(1e-12).log()  # (B, num_classes)


def is_folds_folder(path: str | Path) -> bool:
    return (Path(path) / FOLDS_FILE).is_file()


def expand(models: Sequence[str | Path]) -> tuple[list[Path], Decision | None]:
    """The member checkpoints of ``models`` (files, or folds folders: their members) and the
    operating point of the ensemble (a single folds folder's; None otherwise)."""
    paths: list[Path] = []
    decision = None
    for model in map(Path, models):
        if not model.is_dir():
            paths.append(model)
            continue
        if not is_folds_folder(model):
            raise VolumetricError(
                f"{model}: a folder given as a model must be a finished cross-validation run "
                f"(volumetric-train --folds K), with its {FOLDS_FILE}"
            )
        record = json.loads((model / FOLDS_FILE).read_text())
        paths += [model / member for member in record["members"]]
        decision = Decision.from_dict(record.get("decision"))
    return paths, decision if len(models) == 1 else None


def check_members(members: Sequence[Checkpoint]) -> None:
    """Members must classify the same classes from the same input: else one error line naming
    the first difference and the two files."""
    first = members[0]
    for other in members[1:]:
        for what, mine, theirs in (
            ("class names", first.class_names, other.class_names),
            ("preprocessing", first.preprocessing, other.preprocessing),
            ("input channels", first.in_channels, other.in_channels),
            ("channels", _channels(first), _channels(other)),
        ):
            if mine != theirs:
                raise VolumetricError(
                    f"the ensemble's members differ in {what}: {first.path} has {mine}, "
                    f"{other.path} has {theirs}"
                )


def _channels(checkpoint: Checkpoint) -> Any:
    return (checkpoint.config.get("data") or {}).get("channels")


def ensemble_decision(members: Sequence[Checkpoint], folds: Decision | None) -> Decision:
    """The ensemble's operating point (its probabilities are already calibrated per member)."""
    if folds is not None:
        return folds
    if any((m.decision or {}).get("threshold") is not None for m in members):
        log.warning(
            "the ensemble predicts by the arg max: its members' thresholds, fitted on other "
            "validation scans, are not combined (a --folds run fits one on its out-of-fold "
            "predictions)"
        )
    positive = {Decision.from_dict(m.decision).positive for m in members}
    return Decision(positive=positive.pop()) if len(positive) == 1 else ARGMAX

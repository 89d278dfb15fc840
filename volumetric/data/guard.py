"""What a trained model refuses to score before reading a scan's voxels: a DICOM series its
training's ``data.series_filter`` left out, and a scan of another modality than it was trained on.

Training records the modalities of its scans (volumetric/data/modality.py) in the checkpoint. A
scan of another known modality gets an error row ("model trained on CT, scan is MR") unless the
user allows it (``volumetric-infer --allow-modality-mismatch``); a scan whose modality nothing
states is scored, with a warning the first time (the model's modalities are then only assumed).
The same filter applies in training: `select_series` leaves the series out and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from volumetric.data.loading import read_in_threads
from volumetric.data.modality import scan_modality
from volumetric.data.series_filter import SeriesFilter
from volumetric.data.source import Entry, ScanSource
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanGuard:
    """A checkpoint's conditions on the scans it scores."""

    series_filter: SeriesFilter | None = None
    modalities: tuple[str, ...] = ()  # of the training scans; (): unknown
    allow_mismatch: bool = False

    def check(self, source: ScanSource) -> tuple[str, str | None]:
        """(why ``source`` is refused, '' when it is not; its modality, None when unknown)."""
        if self.series_filter is not None:
            problem = self.series_filter.problem(source)
            if problem:
                return problem, None
        modality = scan_modality(source)
        if (
            modality is not None
            and self.modalities
            and modality not in self.modalities
            and not self.allow_mismatch
        ):
            return self.mismatch(source, modality), modality
        return "", modality

    def mismatch(self, source: object, modality: str) -> str:
        """Why a scan of ``modality`` is refused."""
        trained = "/".join(self.modalities)
        return (
            f"{source}: model trained on {trained}, scan is {modality} (pass "
            "--allow-modality-mismatch to score it anyway)"
        )


class UnknownModalityWarning:
    """Says once per run that scans of unknown modality are scored as the model's own."""

    def __init__(self, modalities: Sequence[str]):
        self.modalities, self.said = tuple(modalities), False

    def __call__(self, source: object) -> None:
        if self.said or not self.modalities:
            return
        self.said = True
        log.warning(
            "%s: its modality is unknown (no DICOM Modality, manifest column or JSON sidecar): "
            "scored as the model's %s; later such scans without a word",
            source,
            "/".join(self.modalities),
        )


def select_series(
    series_filter: SeriesFilter | None, entries: list[Entry]
) -> tuple[list[Entry], dict[str, str]]:
    """The entries ``series_filter`` keeps, and those it leaves out with why (each warned)."""
    if series_filter is None or not entries:
        return entries, {}
    problems = read_in_threads(lambda e: series_filter.problem(e.source), entries)
    left_out = {str(e.source): p for e, p in zip(entries, problems) if p}
    for problem in left_out.values():
        log.warning("%s", problem)
    return [e for e, p in zip(entries, problems) if not p], left_out


def evaluable(guard: ScanGuard, entries: list[Entry]) -> list[Entry]:
    """The labelled entries a model may be evaluated on. Series the training's filter leaves out
    are left out, each warned, as training leaves them out; a scan of another known modality than
    training's is a VolumetricError, before anything is read or written, unless the guard allows
    it: metrics over scans the model would refuse in use would describe neither."""
    kept, _ = select_series(guard.series_filter, entries)
    if not guard.modalities or guard.allow_mismatch or not kept:
        return kept
    modalities = read_in_threads(lambda e: scan_modality(e.source), kept)
    other = [
        (e, m) for e, m in zip(kept, modalities) if m is not None and m not in guard.modalities
    ]
    if other:
        entry, modality = other[0]
        raise VolumetricError(
            f"{len(other)} of {len(kept)} scans are of another modality than the model's training "
            f"scans; the first: {guard.mismatch(entry.source, modality)}"
        )
    if None in modalities:
        UnknownModalityWarning(guard.modalities)(kept[modalities.index(None)].source)
    return kept

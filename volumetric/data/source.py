"""What one scan is read from, and one labelled item of a data set.

A scan is one image per channel. An image is a file (NIfTI, NRRD, MetaImage, …) or a DICOM
series: a folder, with the SeriesInstanceUID that picks the series when the folder holds several.
Most scans are one file: ``ScanSource.of(path)``. A manifest with several image columns
(``data.channels``) gives scans of several images, e.g. the T1, T2 and FLAIR files of one subject;
they are resampled onto the first image's grid and stacked as channels (volumetric/data/dataset.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


@dataclass(frozen=True)
class ImageRef:
    """One image: a file, or a DICOM folder and (when it holds several) the series to read."""

    path: Path
    series_uid: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.series_uid is None else f"{self.path} [{self.series_uid}]"


@dataclass(frozen=True)
class ScanSource:
    """The images of one scan, one per channel; the first one's grid is the scan's grid.
    ``modality``: what a manifest's modality column says of it (not part of its identity)."""

    images: tuple[ImageRef, ...]
    modality: str | None = field(default=None, compare=False)

    @classmethod
    def of(cls, scan: str | Path | ImageRef | ScanSource) -> ScanSource:
        """A single-image scan from a path (or the source itself)."""
        if isinstance(scan, ScanSource):
            return scan
        return cls((scan if isinstance(scan, ImageRef) else ImageRef(Path(scan)),))

    @classmethod
    def channels(cls, paths: list[Path], modality: str | None = None) -> ScanSource:
        return cls(tuple(ImageRef(Path(p)) for p in paths), modality)

    @property
    def path(self) -> Path:
        """The first image's path: the ``path`` column of prediction tables."""
        return self.images[0].path

    @property
    def series_uid(self) -> str:
        """The first image's SeriesInstanceUID when it is one of several in its folder, else ''."""
        return self.images[0].series_uid or ""

    def __str__(self) -> str:
        """The scan's name in messages: its path (and series), or its images joined by ' + '."""
        return " + ".join(map(str, self.images))


class Entry(NamedTuple):
    """One scan of a data set: its source, its class name (None when unknown) and its group (the
    patient or subject it belongs to; None when the data set names none)."""

    source: ScanSource
    label: str | None
    group: str | None = None

"""Which DICOM series a model takes: ``data.series_filter``, applied the same way in training and
inference.

An archive folder holds more than the volumes a model was made for: other modalities, derived
series (MIPs, reformats, subtractions), scouts, contrast phases. The filter names what to keep:

    data:
      series_filter:
        modality: [CT]          # DICOM Modality (0008,0060) among these; [] or absent: any
        image_type: original    # original: ImageType ORIGINAL\\PRIMARY only (no DERIVED,
                                # SECONDARY, MIP, reformats); any: every type
        min_slices: 20          # fewer slices: left out (a scout, a thin slab)
        description: 'venous'   # a regular expression the SeriesDescription must contain

A series that fails one condition is left out with the reason: in training it is listed in
dataset_summary.json (``left_out_series``) and does not train; in inference it gets a row whose
error column says why, and a warning. Scan files other than DICOM series are never filtered (they
carry none of these tags); a manifest's scans are filtered like any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volumetric.data.dicom import MIN_SLICES, SliceHeader, series_headers
from volumetric.data.source import ScanSource
from volumetric.errors import ConfigError, VolumetricError

KEYS = ("modality", "image_type", "min_slices", "description")
IMAGE_TYPES = ("original", "any")


@dataclass(frozen=True)
class SeriesFilter:
    """The conditions of ``data.series_filter`` (see the module docstring)."""

    modality: tuple[str, ...] = ()
    image_type: str = "any"
    min_slices: int = MIN_SLICES
    description: str | None = None

    @classmethod
    def from_config(cls, settings: Mapping[str, Any] | None) -> SeriesFilter | None:
        """The filter of a config's ``data.series_filter`` (None: none); a ConfigError naming the
        key for anything it cannot use."""
        if settings is None:
            return None
        if not isinstance(settings, Mapping):
            raise ConfigError(f"config data.series_filter must be a mapping of {', '.join(KEYS)}")
        unknown = sorted(set(settings) - set(KEYS))
        if unknown:
            raise ConfigError(
                f"unknown config key data.series_filter.{unknown[0]}; known: {', '.join(KEYS)}"
            )
        modality = settings.get("modality") or []
        if isinstance(modality, str):
            modality = [modality]
        if not all(isinstance(m, str) and m.strip() for m in modality):
            raise ConfigError(
                f"config data.series_filter.modality={modality!r} must list modalities, e.g. [CT]"
            )
        image_type = settings.get("image_type", "any")
        if image_type not in IMAGE_TYPES:
            raise ConfigError(
                f"config data.series_filter.image_type={image_type!r} is not one of {IMAGE_TYPES}"
            )
        min_slices = settings.get("min_slices", MIN_SLICES)
        if not isinstance(min_slices, int) or isinstance(min_slices, bool) or min_slices < 1:
            raise ConfigError(
                f"config data.series_filter.min_slices={min_slices!r} must be a positive count"
            )
        description = settings.get("description")
        if description is not None:
            try:
                re.compile(str(description))
            except re.error as error:
                raise ConfigError(
                    f"config data.series_filter.description={description!r} is not a regular "
                    f"expression ({error})"
                ) from None
        return cls(
            tuple(m.strip().upper() for m in modality),
            image_type,
            min_slices,
            None if description is None else str(description),
        )

    def problem(self, source: ScanSource) -> str:
        """Why ``source`` is left out ('' when it is kept): the first condition a DICOM series of
        it fails. Series that cannot be read are kept: reading them says what is wrong."""
        for image in source.images:
            if not image.path.is_dir():
                continue
            try:
                headers = series_headers(image.path, image.series_uid, str(source))
            except VolumetricError:
                continue
            reason = self._refuses(headers)
            if reason:
                return f"{source}: left out by data.series_filter: {reason}"
        return ""

    def _refuses(self, headers: list[SliceHeader]) -> str:
        first = headers[0]
        if self.modality and first.modality not in self.modality:
            return f"modality {first.modality or 'unknown'} is not one of {list(self.modality)}"
        kinds = [k.strip().upper() for k in first.image_type.split("\\")]
        if self.image_type == "original" and kinds[:2] != ["ORIGINAL", "PRIMARY"]:
            return f"ImageType {first.image_type or 'unknown'} is not ORIGINAL\\PRIMARY"
        slices = sum(h.frames for h in headers)
        if slices < self.min_slices:
            return f"{slices} slices, fewer than min_slices {self.min_slices}"
        if self.description is not None and not re.search(self.description, first.description):
            return f"SeriesDescription {first.description!r} does not match {self.description!r}"
        return ""

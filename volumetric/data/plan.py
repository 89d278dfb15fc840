"""A preprocessing plan from the data itself, the way nnU-Net plans from a data set's fingerprint.

`fingerprint` reads the scans (or a seeded sample of them) and measures what the plan needs: the
modality (DICOM, manifest or sidecar; without them, intensities below −500 are taken for the air
of a CT in Hounsfield units, which an MRI does not have), the voxel spacings and sizes, and a
seeded sample of the foreground intensities. `plan` turns it into config values, each with why:

- CT: ``intensity: ct_dataset``: clipped to the 0.5–99.5 percentiles of the data set's foreground
  (voxels above −500 HU: the body, not the air), then standardized with the clipped foreground's
  mean and standard deviation, which go into ``data.ct_window`` and ``data.ct_stats`` and with
  them into every checkpoint; no bias-field augmentation (CT has no coil shading).
- MRI (and anything else): ``intensity: zscore``, each scan standardized over its own foreground.
- spacing: the median spacing of each axis; when the coarsest median is more than three times the
  finest (thick slices), that axis takes the 10th percentile of its spacings instead, as nnU-Net
  does, so that the thin-slice scans among them are not thrown away.
- when the scans, resampled, are within 25% of one another's size, one ``target_shape`` (the
  largest, rounded up to a patch multiple: nothing is cropped) and batches of several scans;
  otherwise each scan keeps its grid and batches hold one.

`volumetric-plan DATA --output plan.yaml` writes the whole config with a comment on every planned
choice. ``volumetric-train`` without ``--config`` warns when the data contradicts its defaults,
and takes the shared shape itself when every scan's header says the scans are of one size
(`header_shape`: all the scans, their headers only).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from nibabel.orientations import axcodes2ornt

from volumetric.config import Config, default_augment
from volumetric.data.dataset import read_scan
from volumetric.data.loading import read_in_threads
from volumetric.data.modality import scan_modality
from volumetric.data.preflight import Header, read_header, resampled_size
from volumetric.data.source import ScanSource
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)

AIR_HU = -500.0
"""Below this a voxel is air in Hounsfield units: the CT's background, never an MRI intensity."""
ANISOTROPY = 3.0
"""nnU-Net's threshold: an axis this much coarser than the finest is the thick-slice axis."""
SIMILAR_SIZE = 1.25
"""Resampled sizes within this factor of each other share one target shape and batch together."""
SHARED_SHAPE_BATCH = 8
"""Scans of one shape train this many a step: with the built-in model, batches of 8 and max
pooling learned the regions task from 100 scans where batches of one did not (docs/results.md)."""
SAMPLE_VOXELS = 20_000
"""Foreground voxels drawn per scan for the intensity statistics."""


@dataclass
class Fingerprint:
    """What `fingerprint` measured; ``modality`` is the planned one (known or inferred)."""

    scans: int
    modality: str
    modality_source: str  # "header" (DICOM, manifest, sidecar) or "intensities"
    spacings: np.ndarray  # (S, 3) mm
    sizes: np.ndarray  # (S, 3) voxels
    foreground: np.ndarray  # (V,) sampled foreground intensities, raw units
    notes: list[str] = field(default_factory=list)


def fingerprint(
    sources: Sequence[ScanSource], *, sample: int | None = None, seed: int = 0
) -> Fingerprint:
    """Read ``sources`` (all, or ``sample`` of them drawn with ``seed``) and measure them."""
    rng = np.random.default_rng(seed)
    chosen = list(sources)
    if sample is not None and len(chosen) > sample:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), sample, replace=False))]
    if not chosen:
        raise VolumetricError("no scans to plan from")
    modalities: Counter[str | None] = Counter()
    spacings, sizes, minima, voxels = [], [], [], []
    for source in chosen:
        image = read_scan(source)
        data = image.data[0].numpy().astype(np.float32)  # (W, H, D), the first channel
        modalities[scan_modality(source)] += 1
        spacings.append(image.spacing)
        sizes.append(image.spatial_shape)
        minima.append(float(data.min()))
        voxels.append(_foreground_sample(data, rng))
    known = [(m, n) for m, n in modalities.most_common() if m is not None]
    if known:
        modality, source_of = known[0][0], "header"
    else:
        is_ct = float(np.median(minima)) < AIR_HU
        modality, source_of = ("CT" if is_ct else "MR"), "intensities"
    return Fingerprint(
        scans=len(chosen),
        modality=modality,
        modality_source=source_of,
        spacings=np.asarray(spacings, dtype=np.float64),
        sizes=np.asarray(sizes, dtype=np.int64),
        foreground=np.concatenate(voxels),
    )


def _foreground_sample(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to `SAMPLE_VOXELS` voxels of the scan's foreground: above −500 when the scan has air
    in HU, else above the scan's mean (the MRI foreground of intensity: zscore)."""
    threshold = AIR_HU if data.min() < AIR_HU else float(data.mean())
    foreground = data[data > threshold]
    if len(foreground) > SAMPLE_VOXELS:
        foreground = rng.choice(foreground, SAMPLE_VOXELS, replace=False)
    return foreground


def target_spacing(spacings: np.ndarray) -> tuple[list[float], str]:
    """The planned spacing (mm per axis) and why."""
    median = np.median(spacings, axis=0)  # (3,)
    coarse, fine = int(np.argmax(median)), float(np.min(median))
    if median[coarse] > ANISOTROPY * fine:
        planned = median.copy()
        planned[coarse] = np.percentile(spacings[:, coarse], 10)
        why = (
            f"the median spacing, except axis {coarse}: its median {median[coarse]:.2f} mm is "
            f"over {ANISOTROPY:g}x the finest ({fine:.2f} mm), so its 10th percentile"
        )
    else:
        planned, why = median, "the median spacing of each axis"
    return [round(float(s), 2) for s in planned], why


@dataclass
class Plan:
    """Config values planned from a fingerprint, with why (by "section.key")."""

    values: dict[str, dict[str, Any]]
    reasons: dict[str, str]
    augment: list[dict[str, Any]]
    augment_reason: str


def plan(fp: Fingerprint, patch: int | list[int] = 8) -> Plan:
    """The planned data, augment and train values of ``fp`` (module docstring)."""
    spacing, spacing_why = target_spacing(fp.spacings)
    data: dict[str, Any] = {"spacing": spacing}
    reasons = {"data.spacing": spacing_why}
    found = f"{fp.modality} ({'from the headers' if fp.modality_source == 'header' else 'intensities below -500: air in HU'})"
    augment = default_augment()
    if fp.modality == "CT":
        low, high = np.percentile(fp.foreground, [0.5, 99.5])
        clipped = np.clip(fp.foreground, low, high)
        data |= {
            "intensity": "ct_dataset",
            "ct_window": [round(float(low), 1), round(float(high), 1)],
            "ct_stats": [round(float(clipped.mean()), 3), round(float(clipped.std()), 3)],
        }
        reasons |= {
            "data.intensity": f"{found}: Hounsfield units mean the same on every scanner, so "
            "every scan is normalized with the data set's statistics",
            "data.ct_window": "the 0.5 and 99.5 percentiles of the foreground (above -500 HU)",
            "data.ct_stats": "mean and std of the foreground clipped to ct_window",
        }
        augment = [a for a in augment if "RandomBiasField" not in a]
        augment_reason = "the defaults less the bias field: CT has no coil shading"
    else:
        data["intensity"] = "zscore"
        reasons["data.intensity"] = (
            f"{found}: units differ between scanners and sessions, so each scan is "
            "standardized over its own foreground"
        )
        augment_reason = "the defaults (flip, affine, bias field, noise)"
    train: dict[str, Any] = {}
    resampled = fp.sizes * fp.spacings / np.asarray(spacing)  # (S, 3) voxels after resampling
    shape = shared_shape(resampled, patch)
    if shape is not None:
        data["target_shape"] = shape
        train["batch_size"] = SHARED_SHAPE_BATCH
        reasons["data.target_shape"] = (
            f"the scans resampled are within {SIMILAR_SIZE:g}x of each other: the largest, "
            "rounded up to a patch multiple (padding, no cropping), so that they batch together"
        )
        reasons["train.batch_size"] = f"scans of one shape batch: {SHARED_SHAPE_BATCH} a step"
    else:
        data["target_shape"] = None
        reasons["data.target_shape"] = (
            "the scans differ in size by more than 1.25x: each keeps its own grid (batches of one)"
        )
    return Plan({"data": data, "train": train}, reasons, augment, augment_reason)


def shared_shape(resampled: np.ndarray, patch: int | Sequence[int]) -> list[int] | None:
    """One target shape for scans whose sizes (S, 3), in voxels after resampling, are within
    `SIMILAR_SIZE` of each other on every axis: the largest, rounded up to a patch multiple
    (padding, nothing cropped); None when they differ more."""
    patches = [patch] * 3 if isinstance(patch, int) else list(patch)
    largest, smallest = resampled.max(axis=0), resampled.min(axis=0)  # (3,), (3,)
    if not (largest <= SIMILAR_SIZE * smallest).all():
        return None
    return [int(math.ceil(round(float(n), 3) / p) * p) for n, p in zip(largest, patches)]


def header_shape(sources: Sequence[ScanSource], config: Config) -> list[int] | None:
    """`shared_shape` of the scans as their headers describe them (no voxel is read), on the grid
    preprocessing gives them: RAS axis order with ``data.canonical``, ``data.spacing``. None when
    a header does not say (a DICOM series, a file the pre-flight will refuse or an oblique
    orientation) or the sizes differ by more than `SIMILAR_SIZE`."""
    if not sources:
        return None
    headers = read_in_threads(_header, sources)
    sizes = []
    for header in headers:
        if header is not None and config.data.canonical:
            header = ras_ordered(header)
        if header is None:
            return None
        sizes.append(resampled_size(header, config.data.spacing))
    return shared_shape(np.asarray(sizes, dtype=np.float64), config.model.patch_size)


def _header(source: ScanSource) -> Header | None:
    try:
        return read_header(source)
    except VolumetricError:
        return None  # the pre-flight names it


def ras_ordered(header: Header) -> Header | None:
    """The header with its axes in RAS order, as reorientation to RAS+ leaves the grid; None when
    the orientation is not three distinct anatomical axes."""
    try:
        axes = [int(axis) for axis in axcodes2ornt(tuple(header.orientation))[:, 0]]  # RAS axis
    except ValueError:  # a code that is no anatomical direction, e.g. "?"
        return None
    if sorted(axes) != [0, 1, 2]:
        return None
    size, spacing = [0] * 3, [0.0] * 3
    for i, axis in enumerate(axes):
        size[axis], spacing[axis] = header.size[i], header.spacing[i]
    return Header(tuple(size), tuple(spacing), "RAS", header.channels)


def plan_config(base: Config, planned: Plan) -> tuple[dict[str, Any], dict[str, str]]:
    """``base`` (the defaults, or a given config) with the planned values: the whole config as a
    dict, and the reasons by "section.key"."""
    raw = base.to_dict()
    for section, values in planned.values.items():
        raw[section] = {**raw[section], **values}
    raw["augment"] = planned.augment
    return raw, {**planned.reasons, "augment": planned.augment_reason}


def plan_yaml(raw: dict[str, Any], reasons: dict[str, str], fp: Fingerprint) -> str:
    """The config as YAML, with a header saying what was measured and a comment on every planned
    choice."""
    lines = [
        "# Planned by volumetric-plan from "
        f"{fp.scans} scans: modality {fp.modality} ({fp.modality_source}), median spacing "
        f"{np.round(np.median(fp.spacings, axis=0), 2).tolist()} mm, median size "
        f"{np.median(fp.sizes, axis=0).astype(int).tolist()} voxels.",
        "# Every planned value says why; the rest are the built-in defaults.",
    ]
    for section, values in raw.items():
        if section == "augment":
            lines += [f"# augment: {reasons['augment']}", "augment:"]
            dumped = yaml.safe_dump(values, default_flow_style=None, sort_keys=False)
            lines += [line for line in dumped.splitlines()]
            continue
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
            why = reasons.get(f"{section}.{key}")
            lines.append(f"  {text}" + (f"  # {why}" if why else ""))
    return "\n".join(lines) + "\n"


def contradictions(fp: Fingerprint, config: Config) -> list[str]:
    """One line per default the data contradicts (for training without --config)."""
    found = []
    if fp.modality == "CT" and config.data.intensity == "zscore":
        found.append(
            f"these scans look like CT ({fp.modality_source}) but intensity is zscore, the "
            "MRI default: `volumetric-plan DATA --output plan.yaml` proposes intensity: "
            "ct_dataset (the data set's HU statistics) and no bias-field augmentation"
        )
    if config.data.spacing is None and len(fp.spacings) > 1:
        ratio = fp.spacings.max(axis=0) / fp.spacings.min(axis=0)
        if (ratio > 1.5).any():
            spacing, _ = target_spacing(fp.spacings)
            found.append(
                f"voxel spacings differ up to {ratio.max():.1f}x between scans and "
                f"data.spacing is null: data.spacing: {spacing} would give every scan one voxel "
                "size (volumetric-plan)"
            )
    return found

"""Test-time augmentation: label-preserving random views of a preprocessed scan.

The views are the spatial part of the checkpoint's own training augmentation, the changes the
model was trained to ignore and that cannot change the label:

    RandomFlip entries of config["augment"]     as trained (axes, flip probability)
    RandomAffine entries of config["augment"]   as trained (scales, degrees, translation, ...)
    neither listed                              RandomFlip(axes=0): left-right, axis 0 being L→R
                                                after the canonical (RAS+) preprocessing

Intensity augmentations (noise, bias field, gamma, ...) are left out: they perturb the image
rather than show it differently, and would mostly measure the noise they add. No affine is added
to a model trained without one: it never learnt to ignore it. Left-right flips are the exception,
as brains and bodies are near-symmetric and a focal finding keeps its class on either side.
"""

from __future__ import annotations

from typing import Any

import torchio as tio

from volumetric.transforms.augment import build_augmentation

TTA_TRANSFORMS = ("RandomFlip", "RandomAffine")


def build_tta(augment: list[dict[str, Any]] | None) -> tio.Compose:
    """The random views for test-time augmentation from a checkpoint's ``config["augment"]`` list."""
    entries = [
        entry
        for entry in augment or []
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in TTA_TRANSFORMS
    ]
    if not any("RandomFlip" in entry for entry in entries):
        entries.insert(0, {"RandomFlip": {"axes": [0]}})
    pipeline = build_augmentation(entries)
    assert pipeline is not None  # at least the flip
    return pipeline

"""Test-time augmentation: label-preserving random views of a preprocessed scan.

The views are the spatial part of the checkpoint's own training augmentation, the changes the
model was trained to ignore:

    RandomFlip entries of config["augment"]     as trained (axes, flip probability)
    RandomAffine entries of config["augment"]   as trained (scales, degrees, translation, ...)
    neither listed                              no views: --tta is refused with the reason

Intensity augmentations (noise, bias field, gamma, ...) are left out: they perturb the image
rather than show it differently, and would mostly measure the noise they add. Nothing is added
that the model was not trained with: a left-right flip, say, changes the label of a task where
the side is the class (left vs right lesion), and a model trained without flips never learnt to
ignore them.
"""

from __future__ import annotations

from typing import Any

import torchio as tio

from volumetric.errors import VolumetricError
from volumetric.transforms.augment import build_augmentation

TTA_TRANSFORMS = ("RandomFlip", "RandomAffine")


def build_tta(augment: list[dict[str, Any]] | None) -> tio.Compose:
    """The random views for test-time augmentation from a checkpoint's ``config["augment"]`` list."""
    entries = [
        entry
        for entry in augment or []
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in TTA_TRANSFORMS
    ]
    pipeline = build_augmentation(entries)
    if pipeline is None:
        raise VolumetricError(
            "test-time augmentation takes its views from the flips and affine transforms the model "
            "was trained with, and this model was trained with neither; run without --tta"
        )
    return pipeline

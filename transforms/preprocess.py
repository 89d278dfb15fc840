"""The deterministic preprocessing pipeline shared by training, evaluation and inference.

canonical (RAS+) orientation → resample to the configured spacing → refuse scans smaller than
  one patch → intensity normalization → crop-or-pad to the target shape, or pad the native
  grid up to a patch multiple
"""

from __future__ import annotations

from typing import Any

import torchio as tio

from volumetric.transforms.ct_dataset_norm import CTDatasetNormalization
from volumetric.transforms.ct_window import CTWindow
from volumetric.transforms.foreground_zscore import ForegroundZNormalization
from volumetric.transforms.min_shape import RequireMinimumShape


def build_preprocessing(data: dict[str, Any], patch_size: int | list[int]) -> tio.Compose:
    """TorchIO pipeline from the ``data`` config section (as a dict, the form checkpoints carry)."""
    steps: list[tio.Transform] = []
    if data.get("canonical", True):
        steps.append(tio.ToCanonical())
    if data.get("spacing") is not None:
        steps.append(tio.Resample(data["spacing"]))
    x, y, z = (patch_size,) * 3 if isinstance(patch_size, int) else patch_size
    patch = (int(x), int(y), int(z))
    steps.append(RequireMinimumShape(patch))
    intensity = data.get("intensity", "zscore")
    if intensity == "zscore":
        steps.append(ForegroundZNormalization())
    elif intensity == "ct":
        low, high = data.get("ct_window", (-1000.0, 1000.0))
        steps.append(CTWindow(low, high))
    elif intensity == "ct_dataset":
        low, high = data["ct_window"]
        mean, std = data["ct_stats"]
        steps.append(CTDatasetNormalization(low, high, mean, std))
    elif intensity == "minmax":
        steps.append(tio.RescaleIntensity(out_min_max=(0.0, 1.0)))
    elif intensity != "none":
        raise ValueError(
            f"intensity={intensity!r} is not one of zscore, ct, ct_dataset, minmax, none"
        )
    if data.get("target_shape") is not None:
        steps.append(tio.CropOrPad(tuple(data["target_shape"])))
    else:
        steps.append(tio.EnsureShapeMultiple(patch, method="pad"))
    return tio.Compose(steps)

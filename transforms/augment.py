"""Training-time augmentation: TorchIO random transforms named in the YAML config.

    augment:
      - RandomFlip: {axes: [0]}
      - RandomAffine: {scales: 0.1, degrees: 10}

Each entry names a `torchio.Random*` class and its keyword arguments; the list is applied in order.
"""

from __future__ import annotations

from typing import Any

import torchio as tio

from volumetric.errors import VolumetricError


def build_augmentation(entries: list[dict[str, Any]]) -> tio.Compose | None:
    """TorchIO pipeline from the ``augment`` config list; None when the list is empty."""
    steps = []
    for i, entry in enumerate(entries):
        ((name, kwargs),) = entry.items()
        cls = getattr(tio, name, None)
        if not (
            name.startswith("Random") and isinstance(cls, type) and issubclass(cls, tio.Transform)
        ):
            raise VolumetricError(
                f"config augment[{i}]: {name!r} is not a TorchIO random transform (e.g. RandomAffine)"
            )
        try:
            steps.append(cls(**(kwargs or {})))
        except (TypeError, ValueError) as error:
            raise VolumetricError(f"config augment[{i}] {name}: {error}") from None
    return tio.Compose(steps) if steps else None

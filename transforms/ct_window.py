"""CTWindow: clip Hounsfield units to a window and map it linearly onto [0, 1] (CT)."""

from __future__ import annotations

import torchio as tio


class CTWindow(tio.IntensityTransform):
    """Deterministic: clamp to [low, high] HU, then (x − low) / (high − low)."""

    def __init__(self, low: float = -1000.0, high: float = 1000.0, **kwargs):
        super().__init__(**kwargs)
        if not low < high:
            raise ValueError(f"CTWindow needs low < high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
        self.args_names = ["low", "high"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.float().clamp(self.low, self.high)
            image.set_data((data - self.low) / (self.high - self.low))
        return subject

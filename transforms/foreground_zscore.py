"""ForegroundZNormalization: z-score each channel with statistics from its foreground (MRI).

The foreground is every voxel above the channel's mean, the usual cheap head/body mask for MRI, so
the air around the patient does not dilute the statistics. Unlike `tio.ZNormalization` it never
fails or produces NaN: a constant channel (std 0) becomes all zeros.
"""

from __future__ import annotations

import torch
import torchio as tio


class ForegroundZNormalization(tio.IntensityTransform):
    """Deterministic: (x − mean_fg) / std_fg per channel, constant channels → 0."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.args_names = []

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            image.set_data(zscore_foreground(image.data))
        return subject


def zscore_foreground(data: torch.Tensor) -> torch.Tensor:
    """(C, W, H, D) → float32 (C, W, H, D), each channel standardized over its foreground."""
    out = data.float().clone()
    for channel in out:  # (W, H, D) views
        mask = (channel > channel.mean()).float()
        count = mask.sum()
        if count == 0:  # constant channel: every voxel equals the mean
            channel.zero_()
            continue
        mean = (channel * mask).sum() / count
        std = ((channel - mean).square_().mul_(mask).sum() / count).sqrt()
        channel.sub_(mean)
        channel.div_(std) if std > 0 else channel.zero_()
    return out

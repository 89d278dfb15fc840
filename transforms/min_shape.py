"""RequireMinimumShape: refuse a scan that, after resampling, is smaller than one patch.

Padding such a scan up to the patch (or to the target shape) would hand the model a volume that is
mostly padding and one or two tokens of data: a prediction about nothing. It is refused instead,
with the sizes in the message.
"""

from __future__ import annotations

import torchio as tio

from volumetric.errors import VolumetricError


class RequireMinimumShape(tio.Transform):
    """Deterministic check, no change to the data: every spatial size must be at least ``shape``."""

    def __init__(self, shape: tuple[int, int, int], **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.args_names = ["shape"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        actual = tuple(subject.spatial_shape)
        if any(a < s for a, s in zip(actual, self.shape)):
            spacing = "×".join(f"{s:g}" for s in subject.spacing)
            raise VolumetricError(
                f"scan is {'×'.join(map(str, actual))} voxels at {spacing} mm after resampling, smaller than "
                f"one {'×'.join(map(str, self.shape))} patch"
            )
        return subject

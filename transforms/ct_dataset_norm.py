"""CTDatasetNormalization: CT intensities clipped to the data set's foreground range, then
standardized with the data set's foreground mean and standard deviation (nnU-Net's CT scheme).

Unlike MRI, where one scanner's units mean nothing on the next and each scan is z-scored on its
own, CT intensities are Hounsfield units, the same on every scanner: normalizing every scan with
the statistics of the whole training set keeps that meaning (bone stays brighter than fat in
every scan, by the same amount). The statistics are those `volumetric-plan` measures (the 0.5 and
99.5 percentiles and the mean and std of the clipped foreground voxels of the data set) and are
stored with the config in every checkpoint.
"""

from __future__ import annotations

import torchio as tio


class CTDatasetNormalization(tio.IntensityTransform):
    """Deterministic: clamp to [low, high] HU, then (x − mean) / std."""

    def __init__(self, low: float, high: float, mean: float, std: float, **kwargs):
        super().__init__(**kwargs)
        if not low < high or not std > 0:
            raise ValueError(
                f"CTDatasetNormalization needs low < high and std > 0, got low={low}, "
                f"high={high}, std={std}"
            )
        # TorchIO rebuilds a transform from the attributes its args_names name, so they keep the
        # arguments' names; `mean` shadows Transform.mean, a masking method for masking_method=
        # 'mean', which an IntensityTransform without masking never calls.
        self.low, self.high = float(low), float(high)
        self.mean = float(mean)  # type: ignore[method-assign,assignment]
        self.std = float(std)
        self._center = float(mean)  # what apply_transform reads: typed, and never a method
        self.args_names = ["low", "high", "mean", "std"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.float().clamp(self.low, self.high)
            image.set_data((data - self._center) / self.std)
        return subject

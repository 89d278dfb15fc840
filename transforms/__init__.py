"""TorchIO pipelines (preprocessing, augmentation) and custom transforms, one per file."""

from volumetric.transforms.augment import build_augmentation
from volumetric.transforms.ct_dataset_norm import CTDatasetNormalization
from volumetric.transforms.ct_window import CTWindow
from volumetric.transforms.foreground_zscore import ForegroundZNormalization
from volumetric.transforms.preprocess import build_preprocessing
from volumetric.transforms.tta import build_tta

__all__ = [
    "CTDatasetNormalization",
    "CTWindow",
    "ForegroundZNormalization",
    "build_augmentation",
    "build_preprocessing",
    "build_tta",
]

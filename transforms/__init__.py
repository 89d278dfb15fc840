"""TorchIO pipelines (preprocessing, augmentation) and custom transforms, one per file."""

from transforms.augment import build_augmentation
from transforms.ct_window import CTWindow
from transforms.foreground_zscore import ForegroundZNormalization
from transforms.preprocess import build_preprocessing
from transforms.tta import build_tta

__all__ = [
    "CTWindow",
    "ForegroundZNormalization",
    "build_augmentation",
    "build_preprocessing",
    "build_tta",
]

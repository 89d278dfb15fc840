"""Classifiers."""

from volumetric.models.vit3d import VolumeTransformer

__all__ = ["VolumeTransformer"]

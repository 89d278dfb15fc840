"""Model architectures by name: the method's VolumeTransformer and a CNN baseline to compare against.

    vit3d         VolumeTransformer (volumetric/models/vit3d.py), the softmax-free seq-norm ViT
    densenet121   MONAI's 3D DenseNet121, the usual CNN baseline for whole-volume classification;
                  of the config's model section it takes in_channels and dropout

A checkpoint stores ``arch`` and ``model_args``, the keyword arguments of that architecture's
constructor here and nothing else, so ``ARCHITECTURES[arch](**model_args)`` rebuilds the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from volumetric.models.vit3d import VolumeTransformer


def densenet121(*, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    """MONAI's 3D DenseNet121 with this package's argument names."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes, dropout_prob=dropout
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "vit3d": VolumeTransformer,
    "densenet121": densenet121,
}


HEADS: dict[str, str] = {"vit3d": "head.", "densenet121": "class_layers.out."}
"""The state-dict prefix of each architecture's classification head (replaced when fine-tuning
from a checkpoint of other classes)."""


def _check_arch(arch: str) -> Callable[..., nn.Module]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def model_arguments(arch: str, settings: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The constructor arguments of ``arch`` from a config's model section (keys it does not take,
    such as the ViT's for a CNN, are left out) plus ``num_classes``."""
    accepted = inspect.signature(_check_arch(arch)).parameters
    return {
        "num_classes": num_classes,
        **{k: v for k, v in settings.items() if k in accepted and k != "num_classes"},
    }


def build_model(arch: str, model_args: dict[str, Any]) -> nn.Module:
    """Instantiate ``arch`` with ``model_args``; ValueError for an unknown architecture."""
    return _check_arch(arch)(**model_args)

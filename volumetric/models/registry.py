"""Model architectures by name: the method's VolumeTransformer and a CNN baseline to compare against.

    vit3d         VolumeTransformer (volumetric/models/vit3d.py), the softmax-free seq-norm ViT
    densenet121   MONAI's 3D DenseNet121, the usual CNN baseline for whole-volume classification;
                  of the model section it uses in_channels and dropout, the ViT keys are ignored

Checkpoints store ``model_args`` with ``arch``; those written before ``arch`` existed are vit3d.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from volumetric.models.vit3d import VolumeTransformer

ARCHITECTURES = ("vit3d", "densenet121")


def build_model(model_args: dict[str, Any]) -> nn.Module:
    """Instantiate ``model_args["arch"]`` (default vit3d) with the other arguments; ValueError if unknown."""
    args = dict(model_args)
    arch = args.pop("arch", "vit3d")
    if arch == "vit3d":
        return VolumeTransformer(**args)
    if arch == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(
            spatial_dims=3,
            in_channels=args.get("in_channels", 1),
            out_channels=args["num_classes"],
            dropout_prob=args.get("dropout", 0.0),
        )
    raise ValueError(f"arch={arch!r} is not one of {ARCHITECTURES}")

"""Architectures by name: one `ArchitectureSpec` each, holding everything the package knows of it.

    vit3d         VolumeTransformer (volumetric/models/vit3d.py), the softmax-free seq-norm ViT
    densenet121   MONAI's 3D DenseNet121, the usual CNN baseline for whole-volume classification;
                  of the config's model section it takes in_channels and dropout

A spec names the constructor, the state-dict prefix of the classification head (replaced when
fine-tuning to other classes), what the model supports (``tokens``: the token interface of
VolumeTransformer, which relevance maps and freezing blocks need; ``export``: ONNX and
torch.export), and checks of its own config keys and of the inputs it can train on. The rest of
the package asks the spec, never the model's type.

A checkpoint stores ``arch`` and ``model_args``, the keyword arguments of that architecture's
constructor and nothing else, so ``architecture(arch).build(**model_args)`` rebuilds the model.

Adding a backbone is one spec. From outside the package, without editing it, a spec is
registered through the ``volumetric.architectures`` entry-point group (the entry point's name is
the architecture's name), e.g. in the user's pyproject.toml:

    [project.entry-points."volumetric.architectures"]
    resnet18_3d = "my_models:RESNET18_3D"      # an ArchitectureSpec named resnet18_3d

so that every process (volumetric-train, volumetric-infer, ...) finds it once that package is
installed.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from volumetric.errors import VolumetricError
from volumetric.models.vit3d import (
    FORM_OPTIONS,
    VolumeTransformer,
    check_model_arguments,
    resolve_form,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "volumetric.architectures"


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture: how to build it and what it supports.

    ``build``: keyword-only constructor taking ``num_classes`` and the model arguments (of the
    config's model section, it receives the keys its signature names). ``head_prefix``: the
    state-dict prefix of the classification head. ``tokens``: the model has VolumeTransformer's
    token interface (``patch_embed``, ``embed``, ``blocks``, ``forward_blocks``,
    ``forward_head``): relevance maps and ``train.freeze_blocks`` work with it. ``export``:
    ``volumetric-export`` can trace it; ``export_limits`` says what its graphs refuse.
    ``check_config(settings)`` raises a ValueError starting with the key's name for a model-section
    value the architecture cannot use; ``check_input(batch_sizes, shape)`` one for a training input
    it cannot take (``batch_sizes``: every batch size an epoch can have; ``shape``: the smallest
    (W, H, D) a scan has after preprocessing). ``complete(arguments)`` writes out the values
    the constructor would otherwise derive (the vit3d form options' ``None``), so that a
    checkpoint records the model as built.
    """

    name: str
    build: Callable[..., nn.Module]
    head_prefix: str
    description: str = ""
    tokens: bool = False
    export: bool = True
    export_limits: str = "none known"
    check_config: Callable[[Mapping[str, Any]], None] | None = None
    check_input: Callable[[set[int], tuple[int, int, int]], None] | None = None
    complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def arguments(
        self, settings: Mapping[str, Any], num_classes: int, *, complete: bool = True
    ) -> dict[str, Any]:
        """The constructor's arguments from a config's model section (keys it does not take,
        such as the ViT's for a CNN, are left out) plus ``num_classes``, with the values the
        constructor would derive itself written out by ``complete`` (what a checkpoint stores:
        a default that changes later must not change a saved model). ``complete=False`` for the
        upgrade of an old file, whose missing values meant the defaults of its own time."""
        accepted = inspect.signature(self.build).parameters
        chosen = {k: v for k, v in settings.items() if k in accepted and k != "num_classes"}
        arguments = {"num_classes": num_classes, **chosen}
        return self.complete(arguments) if complete and self.complete else arguments


# ------------------------------------------------------------------------------- the built-ins


def _check_vit_config(settings: Mapping[str, Any]) -> None:
    keys = inspect.signature(check_model_arguments).parameters
    check_model_arguments(**{k: v for k, v in settings.items() if k in keys})


def _complete_vit_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The form options left at ``None`` replaced by the attention kind's default, and the conv
    stem's norm written out (its default changed once; a checkpoint must say which it has)."""
    attention = arguments.get("attention", "seqnorm")
    form = {k: arguments.get(k) for k in FORM_OPTIONS}
    stem_norm = inspect.signature(VolumeTransformer).parameters["stem_norm"].default
    return {"stem_norm": stem_norm, **arguments, **resolve_form(attention, **form)}


def densenet121(*, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    """MONAI's 3D DenseNet121 with this package's argument names."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes, dropout_prob=dropout
    )


def _check_densenet_config(settings: Mapping[str, Any]) -> None:
    channels, dropout = settings.get("in_channels", 1), settings.get("dropout", 0.0)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {channels!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def densenet_final_grid(shape: Iterable[int]) -> tuple[int, ...]:
    """The (W, H, D) of DenseNet121's last feature map for an input of ``shape``: a stride-2
    convolution and max pooling (each ⌈s/2⌉), then three transitions (each ⌊s/2⌋)."""
    return tuple(math.ceil(math.ceil(s / 2) / 2) // 8 for s in shape)


def _check_densenet_input(batch_sizes: set[int], shape: tuple[int, int, int]) -> None:
    """In training its last BatchNorm needs more than one value per channel: a batch of one scan
    needs a last feature map of more than one voxel."""
    final = densenet_final_grid(shape)
    values = math.prod(final)
    if values == 0:
        raise ValueError(
            f"data.target_shape: an input of {'×'.join(map(str, shape))} is too small for "
            "densenet121, which halves it five times: make each axis at least 32 (data.target_shape "
            "or data.spacing)"
        )
    if values * min(batch_sizes) < 2:
        raise ValueError(
            f"train.batch_size: densenet121 normalizes its last feature map over the batch in "
            f"training; a {'×'.join(map(str, shape))} input leaves one voxel of it, so a batch of "
            "one scan gives one value per channel: set train.batch_size to 2 or more with "
            "data.target_shape (and a training split that leaves no batch of one), or a "
            "data.target_shape of at least 64 on one axis"
        )


BUILT_IN = (
    ArchitectureSpec(
        name="vit3d",
        build=VolumeTransformer,
        head_prefix="head.",
        description="VolumeTransformer, the softmax-free seq-norm ViT",
        tokens=True,
        export_limits="a volume of a single patch",
        check_config=_check_vit_config,
        complete=_complete_vit_arguments,
    ),
    ArchitectureSpec(
        name="densenet121",
        build=densenet121,
        head_prefix="class_layers.out.",
        description="MONAI's 3D DenseNet121",
        export_limits="a volume whose last feature map is one voxel",
        check_config=_check_densenet_config,
        check_input=_check_densenet_input,
    ),
)


# ------------------------------------------------------------------------------------ lookups


@cache
def architectures() -> dict[str, ArchitectureSpec]:
    """Every architecture by name: the built-ins, then those of installed entry points (read once
    per process; `architectures.cache_clear()` reads them again)."""
    found = {spec.name: spec for spec in BUILT_IN}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in found:
            log.warning(
                "entry point %s: %s is already registered; ignored", point.value, point.name
            )
            continue
        try:
            spec = point.load()
        except Exception as error:  # a broken plug-in must not stop the others
            log.warning("entry point %s (%s) failed to load: %s", point.name, point.value, error)
            continue
        if not isinstance(spec, ArchitectureSpec) or spec.name != point.name:
            log.warning(
                "entry point %s (%s) is not an ArchitectureSpec named %r; ignored",
                point.name,
                point.value,
                point.name,
            )
            continue
        found[spec.name] = spec
    return found


class UnknownArchitecture(VolumetricError, ValueError):
    """An architecture name that no installed spec carries: the user's doing (a config, a
    checkpoint from another installation), and a ValueError to code that builds models."""


def architecture(name: str) -> ArchitectureSpec:
    """The spec registered as ``name``; an `UnknownArchitecture` naming it and the known ones."""
    known = architectures()
    if name not in known:
        raise UnknownArchitecture(
            f"arch={name!r} is not installed (known: {', '.join(known)}; others come from "
            f"packages registering a {ENTRY_POINT_GROUP} entry point)"
        )
    return known[name]


def model_arguments(arch: str, settings: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The constructor arguments of ``arch`` from a config's model section (see
    `ArchitectureSpec.arguments`)."""
    return architecture(arch).arguments(settings, num_classes)


def build_model(arch: str, model_args: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``arch`` with ``model_args``; VolumetricError for an unknown architecture."""
    return architecture(arch).build(**model_args)

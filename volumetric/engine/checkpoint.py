"""Checkpoints: everything inference needs in one .pt file, loaded as untrusted input.

A checkpoint holds the model's constructor arguments, the class names, the preprocessing settings
and the resolved config next to the weights, so ``volumetric-infer`` needs nothing but the file and
a scan. Training checkpoints also carry the optimizer, schedule and history for ``--resume``.
Loading uses ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volumetric import __version__
from volumetric.errors import VolumetricError, first_line
from volumetric.io import atomic_torch_save
from volumetric.models.registry import build_model

FORMAT = "volumetric-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    model_args: dict[str, Any],
    class_names: list[str],
    preprocessing: dict[str, Any],
    config: dict[str, Any],
    **state: Any,
) -> None:
    """Write a checkpoint atomically; ``state`` adds training state (optimizer, epoch, history, ...)."""
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "volumetric_version": __version__,
            "model_args": model_args,
            "class_names": list(class_names),
            "preprocessing": preprocessing,
            "config": config,
            "model": model.state_dict(),
            **state,
        },
        Path(path),
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a VolumetricError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VolumetricError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise VolumetricError(
            f"{path}: refused to load checkpoint: it is not a plain weights file "
            f"({first_line(error, 'unsupported content')})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise VolumetricError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise VolumetricError(f"{path}: not a volumetric checkpoint")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise VolumetricError(
            f"{path}: checkpoint format version {checkpoint.get('format_version')} is not supported "
            f"(this volumetric {__version__} reads version {FORMAT_VERSION})"
        )
    for key in ("model_args", "class_names", "preprocessing", "model"):
        if key not in checkpoint:
            raise VolumetricError(f"{path}: checkpoint lacks {key!r}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the model with its saved arguments and weights (eval mode, on the CPU)."""
    try:
        model = build_model(checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise VolumetricError(
            f"{path}: weights do not fit the model it describes ({first_line(error)})"
        ) from None
    return model.eval()

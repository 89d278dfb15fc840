"""Export a checkpoint so that the model runs outside this package: ONNX, or a torch.export program.

    export_model("best.pt", "model.onnx", fmt="onnx") writes
      model.onnx                          volume (B, C, W, H, D) float32 → probabilities (B, K)
      model.preprocessing.json            classes, preprocessing settings and steps, input/output
      model.reference_input.nii.gz        a small synthetic scan, axis-aligned but not RAS+
      model.reference_tensor.npy          what the preprocessing makes of it: (C, W, H, D) float32
      model.reference_probabilities.npy   what the checkpoint's model makes of that: (1, K) float32

The graph carries the model and a softmax, nothing of the preprocessing: a deployment reimplements
the steps listed in the JSON and checks itself against the reference pair. Batch and the three
spatial axes are dynamic (each spatial size any multiple of the patch size), because the position
embedding follows the token grid and scans differ in size.

Tracing runs with size-oblivious shape reasoning, so that an axis with a single token stays
within the traced graph rather than being specialized away. Everything is computed before any file
is written, and each file is written atomically; the model file comes last.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from torch import Tensor, nn

from volumetric.atomic_files import atomic_write_bytes
from volumetric.checkpoint import Checkpoint, load_checkpoint
from volumetric.data.dataset import preprocess_scan, read_scan
from volumetric.errors import VolumetricError, first_line
from volumetric.layers.mlp import Mlp
from volumetric.layers.patch_embed import as_triple
from volumetric.transforms import build_preprocessing
from volumetric.version import __version__

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
"""Export format → the file suffix the output must have."""
ONNX_OPSETS = range(18, 24)
"""Opsets an ONNX export may ask for: torch's exporter builds opset 18 and converts upwards."""
DEFAULT_OPSET = 20
"""The opset written unless asked otherwise (torch's default), named here so that the JSON can
say which one the file holds."""
INPUT_NAME, OUTPUT_NAME = "volume", "probabilities"
REFERENCE_SHAPE = (67, 45, 38)
"""Voxels per axis of the reference scan after resampling (at least two patches and a bit more):
anisotropic, not a patch multiple, so that padding shows; over 64 on one axis so that a DenseNet
still has more than one voxel in its last feature map (see `_limits`)."""
REFERENCE_SPACING = (0.8, 1.25, 2.0)
"""The reference scan's own voxel size in mm, before resampling."""
REFERENCE_AXES = (0, 2, 1)
"""The canonical (RAS+) axis each voxel axis of the reference scan becomes: see its affine."""


class Probabilities(nn.Module):
    """The exported graph: a classifier's logits turned into class probabilities, (B, K)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, volume: Tensor) -> Tensor:
        return self.model(volume).float().softmax(dim=1)  # (B, K)


def export_model(
    checkpoint: str | Path, output: str | Path, *, fmt: str, opset: int | None = None
) -> list[Path]:
    """Export ``checkpoint`` to ``output`` (suffix .onnx or .pt2, as ``fmt``) and write the
    preprocessing description and the reference pair beside it.

    Returns the paths written, the model file first. Raises VolumetricError for a missing or
    unreadable checkpoint, an unknown format, a bad opset or output name, a folder that cannot be
    written, a missing exporter package, and a model the exporter cannot capture.
    """
    output = _check_request(Path(checkpoint), Path(output), fmt, opset)
    opset = (opset or DEFAULT_OPSET) if fmt == "onnx" else None
    state = load_checkpoint(checkpoint)
    if not state.spec.export:
        raise VolumetricError(f"{checkpoint}: a {state.arch} model cannot be exported")
    model = _inference_copy(state.build_model())
    settings = dict(state.preprocessing)
    patch = as_triple(settings["patch_size"], "patch_size")
    in_channels = state.in_channels
    names = _companions(output)
    if Path(checkpoint).resolve() in {p.resolve() for p in [output, *names.values()]}:
        raise VolumetricError(f"{output}: the export would overwrite the checkpoint it reads")
    scan, tensor = _reference_pair(settings, patch, in_channels)
    probabilities = _reference_probabilities(model, tensor, checkpoint)
    description = _description(state, fmt, opset, output, names, patch, in_channels)
    text = json.dumps(description, indent=2, ensure_ascii=False) + "\n"
    program = _export_program(model, patch, in_channels, checkpoint)
    if fmt == "onnx":
        data = _onnx_bytes(program, opset, description, checkpoint)
    else:
        data = _pt2_bytes(program, text)
    contents = {
        names["preprocessing"]: text.encode("utf-8"),
        names["reference_input"]: scan,
        names["reference_tensor"]: _npy_bytes(tensor.numpy()),
        names["reference_probabilities"]: _npy_bytes(probabilities),
        output: data,  # last: a model file on disk implies its companions are there
    }
    for path, content in contents.items():
        try:
            atomic_write_bytes(path, content)
        except OSError as error:
            raise VolumetricError(f"{path}: cannot write ({first_line(error)})") from None
    return [output, *names.values()]


def _companions(output: Path) -> dict[str, Path]:
    """The files written beside ``output`` (dir/name.onnx → dir/name.preprocessing.json, ...)."""
    stem = output.with_suffix("")
    return {
        key: Path(f"{stem}.{key}{suffix}")
        for key, suffix in [
            ("preprocessing", ".json"),
            ("reference_input", ".nii.gz"),
            ("reference_tensor", ".npy"),
            ("reference_probabilities", ".npy"),
        ]
    }


def _check_request(checkpoint: Path, output: Path, fmt: str, opset: int | None) -> Path:
    """The user's choices, checked before anything slow runs; returns ``output``."""
    if fmt not in FORMATS:
        raise VolumetricError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if opset is not None and (fmt != "onnx" or opset not in ONNX_OPSETS):
        raise VolumetricError(
            f"opset {opset!r}: an ONNX export takes an opset from {ONNX_OPSETS[0]} to "
            f"{ONNX_OPSETS[-1]}; a pt2 export takes none"
        )
    if not checkpoint.is_file():
        raise VolumetricError(f"{checkpoint}: checkpoint not found")
    if output.suffix.lower() != FORMATS[fmt]:
        raise VolumetricError(
            f"{output}: a {fmt} export is written to a file ending in {FORMATS[fmt]}"
        )
    if output.is_dir():
        raise VolumetricError(f"{output}: is a folder; give the path of the file to write")
    folder = output.parent.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # atomic_path creates the missing folders below it
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise VolumetricError(f"{output.parent}: folder cannot be written")
    if fmt == "onnx":
        missing = [
            name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None
        ]
        if missing:
            raise VolumetricError(
                f"ONNX export needs the {' and '.join(missing)} package(s): "
                "pip install 'volumetric[export]'"
            )
    return output


def _inference_copy(model: nn.Module) -> nn.Module:
    """``model`` (eval mode, CPU) with the training-only memory savers off: gradient checkpointing
    and the chunked MLP are Python loops around autograd that a graph cannot hold, and without
    gradients they compute nothing different."""
    if hasattr(model, "grad_checkpointing"):
        cast(Any, model).grad_checkpointing = False  # a plain attribute, not a submodule
    for module in model.modules():
        if isinstance(module, Mlp):
            module.memory_lean = False
    return model.eval()


def _export_program(
    model: nn.Module, patch: tuple[int, int, int], in_channels: int, source: str | Path
) -> torch.export.ExportedProgram:
    """Trace ``Probabilities(model)`` with a dynamic batch and each spatial size a dynamic multiple
    of the patch size.

    The example volume is large enough for every architecture (a DenseNet halves it five times)
    and different on each axis, so that no two sizes are taken for one. Size-oblivious reasoning
    keeps an axis of one token inside the graph instead of a guard against it.
    """
    batch = torch.export.Dim("batch", min=1)
    spatial = {
        axis: p * torch.export.Dim(f"tokens_{name}", min=1)
        for axis, p, name in zip((2, 3, 4), patch, "whd")
    }
    example = torch.zeros(
        2, in_channels, *(p * math.ceil(m / p) for p, m in zip(patch, (80, 72, 64)))
    )  # (2, C, W, H, D)
    try:
        with _tracing():
            return torch.export.export(
                Probabilities(model).eval(),
                (example,),
                dynamic_shapes={INPUT_NAME: {0: batch, **spatial}},
            )
    except Exception as error:  # the exporter raises many types for a model it cannot capture
        raise VolumetricError(
            f"{source}: the {type(model).__name__} model cannot be exported with dynamic shapes "
            f"({type(error).__name__}: {first_line(error)})"
        ) from None


@contextmanager
def _tracing() -> Iterator[None]:
    """Size-oblivious shape reasoning for the exporters, and quiet: they log a warning for every
    torchvision operator they cannot register and warn about their own internals, noise to
    someone exporting a model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            # patch() is added at import (install_config_module), unknown to torch's annotations
            torch.fx.experimental._config.patch(backed_size_oblivious=True),  # type: ignore[attr-defined]
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _onnx_bytes(
    program: torch.export.ExportedProgram,
    opset: int | None,
    description: dict[str, Any],
    source: str | Path,
) -> bytes:
    """The ONNX model as one self-contained file (weights inside), with the class names and the
    preprocessing description in its metadata."""
    try:
        with _tracing():
            onnx_program = torch.onnx.export(
                program,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # as in _export_program
        raise VolumetricError(
            f"{source}: the model cannot be converted to ONNX ({type(error).__name__}: "
            f"{first_line(error)})"
        ) from None
    proto = cast("torch.onnx.ONNXProgram", onnx_program).model_proto  # dynamo=True: not None
    for key, value in [
        ("class_names", json.dumps(description["class_names"])),
        ("volumetric_preprocessing", json.dumps(description)),
    ]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _pt2_bytes(program: torch.export.ExportedProgram, description: str) -> bytes:
    """The program as a .pt2 archive, carrying the preprocessing description as an extra file."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"volumetric.preprocessing.json": description})
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def _reference_grid(settings: dict[str, Any], patch: tuple[int, ...]) -> list[int]:
    """Voxels per axis of the reference scan, so that after reorientation and resampling it has
    about ``REFERENCE_SHAPE`` voxels (each at least two patches and a bit). Its voxel axes i, j, k
    become axes 0, 2, 1 of the canonical grid, where the spacing and the patch apply."""
    order = REFERENCE_AXES if settings.get("canonical", True) else (0, 1, 2)
    spacing = settings.get("spacing")
    target = (spacing,) * 3 if isinstance(spacing, (int, float)) else spacing
    wanted = [max(m, 2 * p + 3) for m, p in zip(REFERENCE_SHAPE, patch)]  # canonical order
    return [
        wanted[a] if target is None else math.ceil(wanted[a] * target[a] / own)
        for a, own in zip(order, REFERENCE_SPACING)
    ]


def _reference_scan(settings: dict[str, Any], patch: tuple[int, ...], channels: int) -> bytes:
    """A .nii.gz a deployment can run its own preprocessing on: smooth, seeded, HU-like values
    (air around an ellipsoid body with a bright lesion) on an anisotropic grid whose affine flips
    the first axis and swaps the other two (LSA orientation), so that reorientation, resampling
    and padding all have work to do."""
    shape = _reference_grid(settings, patch)
    grids = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    body = sum(g**2 for g in grids) < 0.7
    lesion = sum((g - c) ** 2 for g, c in zip(grids, (0.3, -0.2, 0.1))) < 0.04
    rng = np.random.default_rng(0)
    volume = np.where(body, 40.0, -1000.0) + 300.0 * lesion + rng.normal(0.0, 20.0, shape)
    data = (
        np.stack([volume + 50.0 * c for c in range(channels)], axis=-1) if channels > 1 else volume
    )
    sx, sy, sz = REFERENCE_SPACING
    affine = np.array(
        [[-sx, 0, 0, 60.0], [0, 0, sz, -40.0], [0, sy, 0, -30.0], [0, 0, 0, 1]]
    )  # voxel i → −x (L), j → +z (S), k → +y (A): REFERENCE_AXES
    image = nib.Nifti1Image(data.astype(np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), mtime=0)


def _reference_pair(
    settings: dict[str, Any], patch: tuple[int, ...], channels: int
) -> tuple[bytes, Tensor]:
    """The reference scan's bytes and the (C, W, H, D) float32 tensor that inference makes of it:
    read back through `read_scan` and preprocessed with `preprocess_scan`, as inference does."""
    scan = _reference_scan(settings, patch, channels)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reference_input.nii.gz"
        path.write_bytes(scan)
        preprocess = build_preprocessing(settings, settings["patch_size"])
        subject = preprocess_scan(path, read_scan(path), preprocess, channels)
    return scan, subject.image.data.float().contiguous()  # (C, W, H, D)


def _reference_probabilities(model: nn.Module, tensor: Tensor, source: str | Path) -> np.ndarray:
    """What the checkpoint's model, on its production path, gives for the reference tensor:
    (1, K) float32."""
    try:
        with torch.no_grad():
            return Probabilities(model)(tensor.unsqueeze(0)).numpy()  # (1, K)
    except RuntimeError as error:  # e.g. a target_shape too small for a DenseNet's pooling
        raise VolumetricError(
            f"{source}: the model cannot classify its own preprocessing's output of shape "
            f"{tuple(tensor.shape)} ({first_line(error)})"
        ) from None


def _preprocessing_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings `build_preprocessing` reads, with its defaults filled in."""
    return {
        "canonical": settings.get("canonical", True),
        "spacing": settings.get("spacing"),
        "intensity": settings.get("intensity", "zscore"),
        "ct_window": list(settings.get("ct_window", (-1000.0, 1000.0))),
        "target_shape": settings.get("target_shape"),
        "patch_size": settings["patch_size"],
    }


def _preprocessing_steps(settings: dict[str, Any]) -> list[str]:
    """`build_preprocessing`'s pipeline in words, in order, for these settings."""
    s = _preprocessing_settings(settings)
    patch = "×".join(map(str, as_triple(s["patch_size"], "patch_size")))
    steps = ["Read the scan with its affine (voxel → world in mm, RAS+ world coordinates)."]
    if s["canonical"]:
        steps.append(
            "Reorient to RAS+: permute and flip the voxel axes so that i, j, k run towards Right, "
            "Anterior, Superior (nibabel's closest canonical orientation)."
        )
    if s["spacing"] is not None:
        steps.append(
            f"Resample to {s['spacing']} mm voxels with linear interpolation: per axis "
            "floor(size × old spacing / new spacing) voxels, the new grid centred on the old one."
        )
    steps.append(f"Refuse the scan if any axis then has fewer voxels than the {patch} patch.")
    intensity = {
        "zscore": "Per channel, subtract the mean and divide by the population std of the "
        "foreground (the voxels above the channel's mean); a constant channel becomes 0.",
        "ct": f"Clip to the CT window {s['ct_window']} HU and map it linearly onto [0, 1].",
        "minmax": "Map the image's minimum to 0 and its maximum to 1 linearly (all channels "
        "together); a constant image is left as it is.",
        "none": "Leave the intensities as they are.",
    }[s["intensity"]]
    steps.append(intensity)
    if s["target_shape"] is not None:
        steps.append(
            f"Crop or zero-pad to {s['target_shape']} voxels, centred (an odd voxel goes at the start)."
        )
    else:
        steps.append(
            f"Zero-pad each axis up to the next multiple of the {patch} patch, centred (an odd "
            "voxel goes at the start)."
        )
    steps.append(
        "Cast to float32 in (C, W, H, D) layout and stack scans into a (B, C, W, H, D) batch."
    )
    return steps


def _limits(state: Checkpoint, fmt: str) -> str:
    """The shapes a graph refuses although the model accepts them, and why."""
    if fmt == "onnx":
        return "none beyond the model's own: any batch, any patch multiple on each spatial axis"
    return (
        "torch.export records a memory-layout guard on a convolution output of one voxel, so "
        f"ExportedProgram.module() refuses {state.spec.export_limits}; "
        "module(check_guards=False) runs it"
    )


def _description(
    state: Checkpoint,
    fmt: str,
    opset: int | None,
    output: Path,
    names: dict[str, Path],
    patch: tuple[int, int, int],
    in_channels: int,
) -> dict[str, Any]:
    """The content of <stem>.preprocessing.json: what a deployment needs to feed the graph."""
    classes = state.class_names
    return {
        "format": "volumetric-export",
        "volumetric_version": __version__,
        "checkpoint_format_version": state.format_version,
        "epoch": state.epoch,
        "arch": state.arch,
        "class_names": classes,
        "model_file": output.name,
        "model_format": fmt,
        "onnx_opset": opset,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "(B, C, W, H, D)",
            "channels": in_channels,
            "spatial": f"W, H, D each any positive multiple of the patch size {list(patch)}; "
            "axes i, j, k of the preprocessed volume",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "layout": f"(B, {len(classes)})",
            "meaning": "softmax of the logits: one probability per class, in class_names order",
        },
        "limits": _limits(state, fmt),
        "preprocessing": _preprocessing_settings(state.preprocessing),
        "preprocessing_steps": _preprocessing_steps(state.preprocessing),
        "reference": {
            "input": names["reference_input"].name,
            "tensor": names["reference_tensor"].name,
            "probabilities": names["reference_probabilities"].name,
            "meaning": "input: a synthetic scan (int16, anisotropic voxels, LSA orientation); "
            "tensor: float32 (C, W, H, D), what preprocessing_steps make of it; probabilities: "
            "float32 (1, K), what the checkpoint's model gives for that tensor. A deployment "
            "preprocesses the input, compares with the tensor, runs the model file on the tensor "
            "and compares with the probabilities.",
        },
    }

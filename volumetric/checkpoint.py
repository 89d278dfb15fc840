"""The checkpoint file: everything needed to rebuild a model and use it, loaded as untrusted input.

Shared by training (writes), evaluation and inference (read). Format version 4:

    format, format_version, volumetric_version
    arch            the architecture's registered name (volumetric.models.registry)
    model_args      that architecture's constructor arguments, exactly: the spec's build(**model_args)
    class_names     the output classes, in logit order
    preprocessing   the data settings and patch size (volumetric.transforms.build_preprocessing)
    config          the whole resolved config of the run
    model           the weights (state_dict)
    epoch, metrics  the epoch the weights are from and its row of metrics.csv
    training        last.pt only: optimizer, schedule, scaler, history, ... (what --resume needs)
    training_groups optional: {salt, hashes} of the training split's groups (leak detection)
    lineage         optional: where the starting weights came from (--init): that file, its
                    hash, architecture, classes, epoch, and its own pretraining and lineage
    pretraining     a pretraining run's files only: mask ratio, decoder, data (pretrained.pt
                    holds the encoder alone, last.pt the encoder and its decoder)
    decision        optional: the operating point and temperature fitted on the validation
                    split (volumetric/evaluation/decision.py); absent: arg max, no temperature
    modalities      optional: the modalities of the training scans (CT, MR, ...), which
                    inference checks; absent or empty: unknown

best.pt holds no training state: inference and fine-tuning need the weights, not the optimizer.
Loading uses ``torch.load(weights_only=True)``: a pickle that would run code is refused.
`load_checkpoint` returns a `Checkpoint`, the file's content after the upgrades below, as typed
fields (the weights under ``weights``); nothing else in the package reads a checkpoint's dict.

Older versions are upgraded when read, so every file ever written keeps loading and predicting
the same: version 1 kept ``arch`` inside ``model_args`` (absent meant vit3d) and the training
state at the top level of both files; in versions 1 and 2 the attention ``seqnorm`` (also the
default, when ``model_args`` names none) normalized queries and keys only, the kind now called
``seqnorm_qk``, since ``seqnorm`` normalizes the values too; up to version 3 a vit3d model had
no LayerScale, attention-output norm, conv stem or stochastic depth, and its ``model_args`` may
lack those keys (and ``seqnorm_affine``), whose defaults may be on today: version 4 writes them
out as they were (off); up to version 4 the conv stem normalized each voxel over its channels,
and version 5 writes that out (``stem_norm: channel``) since the default is now instance. A
change to the format, or to what a saved argument means, bumps ``FORMAT_VERSION`` and adds its
step to ``_UPGRADES``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from volumetric.atomic_files import atomic_torch_save
from volumetric.errors import VolumetricError, first_line
from volumetric.models.registry import ArchitectureSpec, architecture
from volumetric.version import __version__

FORMAT = "volumetric-checkpoint"
FORMAT_VERSION = 5
REQUIRED = ("arch", "model_args", "class_names", "preprocessing", "model")
_V1_TRAINING_KEYS: tuple[str, ...] = ("optimizer", "scheduler", "scaler", "step", "history")
_V1_TRAINING_KEYS += ("best_score", "best_epoch", "partial", "world_size")


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    model_args: dict[str, Any],
    class_names: list[str],
    preprocessing: dict[str, Any],
    config: dict[str, Any],
    arch: str = "vit3d",
    epoch: int = 0,
    metrics: dict[str, float] | None = None,
    training: dict[str, Any] | None = None,
    training_groups: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    pretraining: dict[str, Any] | None = None,
    decision: dict[str, Any] | None = None,
    modalities: list[str] | None = None,
) -> None:
    """Write a checkpoint atomically; ``training`` (last.pt) adds what resuming needs,
    ``training_groups`` the salted hashes of the training split's groups (volumetric/data/split.py),
    ``lineage`` where the starting weights came from, ``pretraining`` a pretraining run's record."""
    content = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "volumetric_version": __version__,
        "arch": arch,
        "model_args": model_args,
        "class_names": list(class_names),
        "preprocessing": preprocessing,
        "config": config,
        "model": model.state_dict(),
        "epoch": epoch,
        "metrics": metrics or {},
    }
    if training is not None:
        content["training"] = training
    for key, value in (
        ("training_groups", training_groups),
        ("lineage", lineage),
        ("pretraining", pretraining),
        ("decision", decision),
        ("modalities", modalities),
    ):
        if value is not None:
            content[key] = value
    atomic_torch_save(content, Path(path))


def _upgrade_v1(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Version 1 → 2: ``arch`` out of ``model_args`` (which keeps the constructor's arguments
    only), training state under ``training`` (a best.pt of version 1 carried it too)."""
    args = dict(checkpoint.get("model_args") or {})
    arch = args.pop("arch", "vit3d")
    if arch in ("vit3d", "densenet121"):  # the two architectures version 1 knew
        args = architecture(arch).arguments(args, args.get("num_classes", 2), complete=False)
    checkpoint.update(arch=arch, model_args=args, format_version=2)
    training = {key: checkpoint.pop(key) for key in _V1_TRAINING_KEYS if key in checkpoint}
    if "optimizer" in training:
        checkpoint["training"] = training
    history = training.get("history") or []
    epoch = checkpoint.get("epoch", 0)
    checkpoint["metrics"] = history[epoch - 1] if 0 < epoch <= len(history) else {}
    return checkpoint


def _upgrade_v2(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Version 2 → 3: attention ``seqnorm`` meant Q and K normalized, V raw; that form is now
    ``seqnorm_qk`` (``seqnorm`` normalizes V too), so the model rebuilds and predicts as it did.
    The resolved config says the same, so that a run configured from it rebuilds this model."""
    if checkpoint.get("arch") == "vit3d":
        args = dict(checkpoint.get("model_args") or {})
        if args.get("attention", "seqnorm") == "seqnorm":  # absent: the default, then seqnorm
            args["attention"] = "seqnorm_qk"
        checkpoint["model_args"] = args
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        model = config["model"]
        if model.get("attention") == "seqnorm":
            config["model"] = {**model, "attention": "seqnorm_qk"}
    checkpoint["format_version"] = 3
    return checkpoint


VIT_OPTIONS_BEFORE_V4 = {
    "seqnorm_affine": False,
    "layer_scale": None,
    "attention_norm": False,
    "stem": "patch",
    "drop_path": 0.0,
}
"""The vit3d options as every model before format version 4 had them (absent keys were off)."""


def _write_out_vit_values(checkpoint: dict[str, Any], values: dict[str, Any]) -> None:
    """A vit3d checkpoint's ``values`` written into ``model_args`` and the resolved config's model
    section wherever the file leaves them out (what it holds stays)."""
    if checkpoint.get("arch") != "vit3d":
        return
    checkpoint["model_args"] = {**values, **(checkpoint.get("model_args") or {})}
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config["model"] = {**values, **config["model"]}


def _upgrade_v3(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Version 3 → 4: a vit3d model's options that version 3 could leave out are written as they
    were then (`VIT_OPTIONS_BEFORE_V4`), in ``model_args`` and in the resolved config, so that a
    default that changed later does not change the model the file holds."""
    _write_out_vit_values(checkpoint, VIT_OPTIONS_BEFORE_V4)
    checkpoint["format_version"] = 4
    return checkpoint


def _upgrade_v4(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Version 4 → 5: the conv stem's normalization became a choice (``stem_norm``) whose new
    default, instance, is not what version 4 had; every vit3d model of version 4 and earlier had
    the per-voxel channel norm, and is rebuilt with it (in ``model_args`` and the resolved config)."""
    _write_out_vit_values(checkpoint, {"stem_norm": "channel"})
    checkpoint["format_version"] = 5
    return checkpoint


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _upgrade_v1,
    2: _upgrade_v2,
    3: _upgrade_v3,
    4: _upgrade_v4,
}


@dataclass
class Checkpoint:
    """A checkpoint file as the current format reads it (after `load_checkpoint`'s upgrades)."""

    arch: str  # the architecture's registered name (volumetric/models/registry.py)
    model_args: dict[str, Any]  # its constructor's arguments, exactly
    class_names: list[str]  # in logit order
    preprocessing: dict[str, Any]  # the data settings and patch size of the training run
    weights: dict[str, Tensor] = field(repr=False)  # the model's state_dict ("model" in the file)
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config
    epoch: int = 0  # the epoch the weights are from
    metrics: dict[str, Any] = field(default_factory=dict)  # that epoch's row of metrics.csv
    training: dict[str, Any] | None = field(default=None, repr=False)  # last.pt: what resumes
    training_groups: dict[str, Any] | None = None  # salted hashes of the training split's groups
    lineage: dict[str, Any] | None = None  # where the starting weights came from (--init)
    pretraining: dict[str, Any] | None = None  # a pretraining run's record: not a classifier
    decision: dict[str, Any] | None = None  # operating point, temperature (evaluation/decision.py)
    modalities: list[str] = field(default_factory=list)  # of the training scans; []: unknown
    format_version: int = FORMAT_VERSION  # always the current one: the content is upgraded
    written_version: int = FORMAT_VERSION  # the format the file was written in
    volumetric_version: str = ""  # the volumetric that wrote it
    path: Path | None = None  # where it was read from

    @property
    def spec(self) -> ArchitectureSpec:
        """The architecture's registry entry; a VolumetricError when it is not installed."""
        try:
            return architecture(self.arch)
        except VolumetricError as error:
            raise VolumetricError(f"{self.path or 'checkpoint'}: {error}") from None

    @property
    def in_channels(self) -> int:
        return int(self.model_args.get("in_channels", 1))

    def lineage_record(self) -> dict[str, Any]:
        """What a run started from this checkpoint records of it (its ``lineage``)."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path else None
        return {
            "path": str(self.path),
            "sha256": digest,
            "arch": self.arch,
            "class_names": self.class_names,
            "epoch": self.epoch,
            "pretraining": self.pretraining,
            "lineage": self.lineage,
        }

    def build_model(self) -> nn.Module:
        """The model with its saved arguments and weights, in eval mode, on the CPU."""
        if self.pretraining is not None:
            raise VolumetricError(
                f"{self.path or 'checkpoint'}: a pretraining checkpoint (an encoder without "
                f"classes): fine-tune it first, volumetric-train DATA --init {self.path}"
            )
        spec = self.spec
        try:
            model = spec.build(**self.model_args)
            model.load_state_dict(self.weights)
        except (TypeError, ValueError, RuntimeError) as error:
            raise VolumetricError(
                f"{self.path or 'checkpoint'}: weights do not fit the model it describes "
                f"({first_line(error)})"
            ) from None
        return model.eval()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read, check and upgrade a checkpoint to the current version; any problem is a
    VolumetricError naming the file."""
    path = Path(path)
    checkpoint = _read(path, map_location)
    version = checkpoint.get("format_version")
    written = version
    while version in _UPGRADES:
        checkpoint = _UPGRADES[version](checkpoint)
        version = checkpoint["format_version"]
    if version != FORMAT_VERSION:
        raise VolumetricError(
            f"{path}: checkpoint format version {written} is not supported "
            f"(this volumetric {__version__} reads versions 1 to {FORMAT_VERSION})"
        )
    for key in REQUIRED:
        if key not in checkpoint:
            raise VolumetricError(f"{path}: checkpoint lacks {key!r}")
    return Checkpoint(
        arch=checkpoint["arch"],
        model_args=dict(checkpoint["model_args"]),
        class_names=list(checkpoint["class_names"]),
        preprocessing=dict(checkpoint["preprocessing"]),
        weights=checkpoint["model"],
        config=checkpoint.get("config") or {},
        epoch=checkpoint.get("epoch", 0),
        metrics=checkpoint.get("metrics") or {},
        training=checkpoint.get("training"),
        training_groups=checkpoint.get("training_groups"),
        lineage=checkpoint.get("lineage"),
        pretraining=checkpoint.get("pretraining"),
        decision=checkpoint.get("decision"),
        modalities=list(checkpoint.get("modalities") or []),
        written_version=cast(int, written),  # a supported version (checked above)
        volumetric_version=checkpoint.get("volumetric_version", ""),
        path=path,
    )


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Set the operating point and temperature of the checkpoint at ``path`` (atomically; the
    rest of the file as it is)."""
    content = _read(Path(path), "cpu")
    content["decision"] = decision
    atomic_torch_save(content, Path(path))


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The file's dict, loaded weights-only; a VolumetricError for anything else."""
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
    return checkpoint

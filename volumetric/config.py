"""Run configuration: dataclasses ⇄ YAML, with unknown keys rejected and `--section.key=value` overrides.

A config file holds up to five sections, each optional (defaults below):

    model:    architecture (the keyword arguments of the architecture, less num_classes)
    data:     deterministic preprocessing, shared by training, evaluation and inference
    augment:  a list of TorchIO random transforms, each ``{Name: {arguments}}``, training only
              (no section: `default_augment`; ``augment: []``: none)
    train:    optimisation and bookkeeping
    pretrain: masked-volume pretraining on unlabeled scans (volumetric-pretrain)

`load_config` reads the defaults, then config files in order, applies overrides and validates; every mistake a user can make is a
`ConfigError` (a VolumetricError) naming the key.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from volumetric.data.series_filter import SeriesFilter
from volumetric.errors import ConfigError
from volumetric.evaluation.decision import check_rule

INTENSITY_MODES = ("zscore", "ct", "ct_dataset", "minmax", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CACHE_MODES = ("disk", "memory", "none")
BAD_SCAN_POLICIES = ("error", "skip")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
SELECTION_KEYS = ("balanced_accuracy", "auroc", "loss")


def default_augment() -> list[dict[str, Any]]:
    """The built-in training augmentation, used when a config has no ``augment`` section.

    Chosen on the demo's validation split (docs/results.md#default-augmentation): flips, a small
    affine and intensity changes cost nothing measurable there, while real scans differ far more
    than the demo's between scanners, sites and patient positions. Each entry:
      - left-right flip: anatomy is near-symmetric, most findings keep their class on either side;
        drop it (``augment: []`` or a list without it) where the side is the label or matters to it
      - ±10% scale, ±10° rotation, ±6 mm shift, 3 scans of 4: positioning and head or body size
      - bias field (coefficients up to 0.3, 3 scans of 10): MRI coil shading, which differs by scanner
      - Gaussian noise up to 0.1 (3 scans of 10): in z-score units (``intensity: zscore``); with
        ``intensity: ct`` the window maps to [0, 1], where 0.1 is 200 HU of the default window:
        lower it, and drop the bias field, which CT does not have
    """
    return [
        {"RandomFlip": {"axes": [0]}},
        {"RandomAffine": {"scales": 0.1, "degrees": 10, "translation": 6, "p": 0.75}},
        {"RandomBiasField": {"coefficients": 0.3, "p": 0.3}},
        {"RandomNoise": {"std": [0, 0.1], "p": 0.3}},
    ]


@dataclass
class ModelConfig:
    patch_size: int | list[int] = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    # seqnorm: Q, K and V sequence-normalized (the method, linear); seqnorm_qk: Q and K only;
    # sima: SimA's L1-normalized Q and K (linear); softmax: the SDPA reference (quadratic)
    attention: str = "seqnorm"
    # learnable per-feature scale and shift after the normalization; null: the kind's default (off)
    seqnorm_affine: bool | None = None
    # per-channel gain on each residual branch, started at this value (CaiT); null: none
    layer_scale: float | None = None
    # LayerNorm of the attention output before its projection; null: the kind's default, on for
    # seqnorm (the form that trains from scratch, docs/method.md#the-default-form), off otherwise
    attention_norm: bool | None = None
    # conv (stride-2 3x3x3 convolutions down to the token grid: sees findings smaller than a patch,
    # docs/results.md) or patch (one Conv3d per patch, a ViT's; the only one for patch sides that
    # are not powers of two)
    stem: str = "conv"
    # the conv stem's normalization: instance (each channel over the volume: keeps contrast) or
    # channel (each voxel over its channels: the conv stem of checkpoint formats up to 4)
    stem_norm: str = "instance"
    drop_path: float = 0.0  # stochastic depth: the last block's branch skip probability
    dropout: float = 0.0
    grad_checkpointing: bool = (
        False  # recompute each block in backward: activation memory of one block
    )
    memory_lean: bool = (
        False  # MLP in token chunks, hidden layer recomputed in backward (very long scans)
    )
    pool: str = "max"  # max over tokens (small focal findings) or mean (diffuse findings)
    arch: str = (
        "vit3d"  # vit3d (this method) or densenet121 (MONAI's CNN baseline; ViT keys ignored)
    )
    in_channels: int = 1


@dataclass
class DataConfig:
    spacing: float | list[float] | None = None  # mm; None keeps each scan's own spacing
    target_shape: list[int] | None = (
        None  # voxels after resampling; None: native grid padded to a patch multiple
    )
    # zscore (MRI, per scan, foreground), ct (HU window → [0, 1]), ct_dataset (clipped to
    # ct_window, then standardized with the data set's ct_stats: volumetric-plan), minmax, none
    intensity: str = "zscore"
    ct_window: list[float] = field(
        default_factory=lambda: [-1000.0, 1000.0]
    )  # HU, for intensity: ct and ct_dataset
    ct_stats: list[float] | None = None  # [mean, std] HU of the clipped foreground (ct_dataset)
    # DICOM series to take: modality, image_type, min_slices, description (data/series_filter.py)
    series_filter: dict[str, Any] | None = None
    canonical: bool = True  # reorient to RAS+
    # a manifest's image columns, one per channel (e.g. [t1, t2, flair]): each image is resampled
    # onto the first one's grid and stacked; None: one image per scan, the manifest's path column
    channels: list[str] | None = None
    on_bad_scan: str = "error"  # error: refuse to train; skip: leave bad scans out, list them


@dataclass
class TrainConfig:
    # 30 epochs: with the default augmentation the demo's best validation epochs were 25 to 27 of 30
    epochs: int = 30
    batch_size: int = 1  # more than 1 needs data.target_shape (one shape per batch)
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # linear warm-up, then cosine decay to 0 at the last epoch
    label_smoothing: float = 0.1
    # imbalanced classes: balanced weighs each class's loss by n / (classes * n_class)
    class_weights: str = "none"
    # shuffle: each scan once per epoch; balanced: draws with replacement, classes equally often
    sampler: str = "shuffle"
    select: str = "balanced_accuracy"  # what picks best.pt: balanced_accuracy, auroc or loss
    # two classes: the class whose sensitivity, PPV and threshold are meant; null: the second
    positive_class: str | None = None
    # two classes: argmax, youden, sensitivity=0.95 or specificity=0.95, fitted on the validation
    # split with best.pt and used for the prediction column (the probabilities do not change)
    threshold: str = "argmax"
    calibrate: bool = False  # temperature scaling fitted on the validation split (changes probs)
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    val_fraction: float = 0.2  # held out of the training data when no --val is given
    seed: int = 0
    init: str | None = None  # checkpoint whose weights start the run (new head for other classes)
    freeze_blocks: int = 0  # keep the patch embedding and the first K blocks fixed (fine-tuning)
    # learning rate of everything but the head, as a share of lr (a fine-tuned encoder moves less)
    encoder_lr_scale: float = 1.0
    # layer-wise decay: block i of D gets a further layer_decay^(D - i); 1 is off (BEiT, MAE)
    layer_decay: float = 1.0
    num_workers: int | str = (
        "auto"  # data loading processes; auto: one per CPU beyond the first, none on 2 CPUs
    )
    # preprocessed volumes: disk (memory-mapped, shared by workers and runs), memory (in each
    # process), none (read every epoch); augmentation runs every epoch whatever this says
    cache: str = "disk"
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto: bf16/fp16 autocast on CUDA, fp32 on CPU


@dataclass
class PretrainConfig:
    """volumetric-pretrain's own settings (docs/training.md#pretraining-on-unlabeled-scans); the
    optimizer, batches, data loading and device come from the train section."""

    epochs: int = 100  # a bound: masked modeling keeps improving slowly for hundreds of epochs
    mask_ratio: float = 0.75  # share of the patch tokens hidden from the encoder (MAE's 0.75)
    decoder_dim: int = 64  # the decoder's width: narrow, it is dropped after pretraining
    decoder_depth: int = 2
    decoder_heads: int = 4
    held_out: float = 0.05  # share of the scans kept for the validation loss and the pictures
    pictures: int = 4  # held-out scans shown in reconstructions.png and report.html


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: list[dict[str, Any]] = field(default_factory=default_augment)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> Config:
        """Check values that types alone do not catch; returns self."""
        m, d, t = self.model, self.data, self.train
        from volumetric.models.registry import architectures

        spec = architectures().get(m.arch)
        if spec is None:
            raise ConfigError(
                f"config model.arch={m.arch!r} is not one of {tuple(architectures())}"
            )
        if spec.check_config is not None:
            try:  # the architecture's own keys only: a CNN ignores the ViT's
                spec.check_config(asdict(m))
            except ValueError as error:  # the message starts with the argument's name
                raise ConfigError(f"config model.{error}") from None
        if spec.complete is not None:  # values left to the architecture (null), written out:
            for key, value in spec.complete(asdict(m)).items():  # a saved config says what ran
                if hasattr(m, key) and getattr(m, key) != value:
                    setattr(m, key, value)
        if d.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"config data.intensity={d.intensity!r} is not one of {INTENSITY_MODES}"
            )
        if t.precision not in PRECISIONS:
            raise ConfigError(f"config train.precision={t.precision!r} is not one of {PRECISIONS}")
        if d.target_shape is not None:
            patch = [m.patch_size] * 3 if isinstance(m.patch_size, int) else m.patch_size
            if len(d.target_shape) != 3 or any(
                s <= 0 or s % p for s, p in zip(d.target_shape, patch)
            ):
                raise ConfigError(
                    f"config data.target_shape={d.target_shape} must be three positive multiples of "
                    f"model.patch_size={m.patch_size}"
                )
        if len(d.ct_window) != 2 or d.ct_window[0] >= d.ct_window[1]:
            raise ConfigError(
                f"config data.ct_window={d.ct_window} must be [low, high] with low < high"
            )
        if d.intensity == "ct_dataset" and (
            d.ct_stats is None or len(d.ct_stats) != 2 or not d.ct_stats[1] > 0
        ):
            raise ConfigError(
                f"config data.intensity=ct_dataset needs data.ct_stats: [mean, std] of the data "
                f"set (got {d.ct_stats!r}); volumetric-plan DATA measures them"
            )
        SeriesFilter.from_config(d.series_filter)
        for name in ("epochs", "batch_size", "grad_accum_steps"):
            if getattr(t, name) < 1:
                raise ConfigError(f"config train.{name} must be at least 1, got {getattr(t, name)}")
        if not 0.0 <= t.val_fraction < 1.0:
            raise ConfigError(f"config train.val_fraction must be in [0, 1), got {t.val_fraction}")
        if t.freeze_blocks < 0 or t.freeze_blocks > 0 and not spec.tokens:
            raise ConfigError(
                f"config train.freeze_blocks={t.freeze_blocks} must be 0, or 1 to model.depth "
                f"for a model of blocks such as vit3d ({m.arch} has none)"
            )
        if t.freeze_blocks > m.depth:
            raise ConfigError(
                f"config train.freeze_blocks={t.freeze_blocks} exceeds model.depth={m.depth}"
            )
        if t.lr <= 0:
            raise ConfigError(f"config train.lr must be positive, got {t.lr}")
        check_rule(t.threshold)
        if not 0 < t.encoder_lr_scale <= 1:
            raise ConfigError(
                f"config train.encoder_lr_scale must be in (0, 1], got {t.encoder_lr_scale}"
            )
        if not 0 < t.layer_decay <= 1 or t.layer_decay < 1 and not spec.tokens:
            raise ConfigError(
                f"config train.layer_decay={t.layer_decay} must be in (0, 1], and 1 for a model "
                f"without blocks ({m.arch})"
            )
        if t.cache not in CACHE_MODES:
            raise ConfigError(f"config train.cache={t.cache!r} is not one of {CACHE_MODES}")
        for name, allowed in (
            ("class_weights", CLASS_WEIGHTS),
            ("sampler", SAMPLERS),
            ("select", SELECTION_KEYS),
        ):
            if getattr(t, name) not in allowed:
                raise ConfigError(
                    f"config train.{name}={getattr(t, name)!r} is not one of {allowed}"
                )
        if not (t.num_workers == "auto" or isinstance(t.num_workers, int) and t.num_workers >= 0):
            raise ConfigError(
                f"config train.num_workers={t.num_workers!r} must be auto or a count, 0 or more"
            )
        if d.channels is not None:
            _check_channels(d.channels, m.in_channels)
        if d.on_bad_scan not in BAD_SCAN_POLICIES:
            raise ConfigError(
                f"config data.on_bad_scan={d.on_bad_scan!r} is not one of {BAD_SCAN_POLICIES}"
            )
        _check_pretrain(self.pretrain)
        for i, entry in enumerate(self.augment):
            if not (
                isinstance(entry, dict)
                and len(entry) == 1
                and isinstance(next(iter(entry.values())) or {}, dict)
            ):
                raise ConfigError(
                    f"config augment[{i}] must be one mapping {{TransformName: {{arguments}}}}, got {entry!r}"
                )
        return self


def _check_pretrain(p: PretrainConfig) -> None:
    for name in ("epochs", "decoder_depth", "decoder_heads", "pictures"):
        value = getattr(p, name)
        if value < (0 if name == "pictures" else 1):
            raise ConfigError(f"config pretrain.{name} must be at least 1, got {value}")
    if not 0.0 < p.mask_ratio < 1.0:
        raise ConfigError(f"config pretrain.mask_ratio must be in (0, 1), got {p.mask_ratio}")
    if p.decoder_dim < 6 or p.decoder_dim % p.decoder_heads:
        raise ConfigError(
            f"config pretrain.decoder_dim={p.decoder_dim} must be at least 6 and a multiple of "
            f"pretrain.decoder_heads={p.decoder_heads}"
        )
    if not 0.0 < p.held_out < 1.0:
        raise ConfigError(f"config pretrain.held_out must be in (0, 1), got {p.held_out}")


def _check_channels(channels: list[str], in_channels: int) -> None:
    if not channels or len(set(channels)) != len(channels) or not all(c.strip() for c in channels):
        raise ConfigError(
            f"config data.channels={channels} must name distinct manifest columns, e.g. [t1, t2]"
        )
    if {"label", "group"} & set(channels):
        raise ConfigError(f"config data.channels={channels}: label and group are not images")
    if len(channels) != in_channels:
        raise ConfigError(
            f"config data.channels names {len(channels)} images but model.in_channels is "
            f"{in_channels}; set model.in_channels: {len(channels)}"
        )


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` and `5e2` as floats as YAML 1.2 does (PyYAML follows 1.1,
    where a float needs a dot, so `lr: 1e-3` would otherwise be the string '1e-3')."""


class DuplicateKey(yaml.YAMLError):
    """A mapping that names one key twice: PyYAML would keep the second value and lose the first."""

    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {key!r} is written twice, on lines {first} and {second}")
        self.key, self.first, self.second = key, first, second


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, str | int | float | bool) and key in seen:
            raise DuplicateKey(key, seen[key], line)
        if isinstance(key, str | int | float | bool):
            seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "pretrain": PretrainConfig,
}


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Coerce ``value`` to the field's annotation where that is lossless (int → float), else raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(
            f"config {key}={value!r} has the wrong type (expected {_type_name(annotation)})"
        )
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(annotation)
            return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or annotation is Any:
        return value
    raise ConfigError(
        f"config {key}={value!r} has the wrong type (expected {_type_name(annotation)})"
    )


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def _upgrade_legacy(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Values older configs (and the configs inside older checkpoints) wrote: ``train.cache``
    was true (in memory) or false."""
    if section == "train" and isinstance(values.get("cache"), bool):
        return {**values, "cache": "memory" if values["cache"] else "none"}
    return values


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown sections or keys are a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    unknown = set(raw) - {f.name for f in fields(Config)}
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {sorted(unknown)}; known: model, data, augment, train, "
            "pretrain"
        )
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        values = _upgrade_legacy(name, values)
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"unknown config key {name}.{key}; known keys of {name}: {', '.join(sorted(known))}"
                )
        sections[name] = cls(
            **{k: _check_type(v, hints[k], f"{name}.{k}") for k, v in values.items()}
        )
    # no augment section: the default; an empty one (or `augment:` alone): none
    augment = (raw["augment"] or []) if "augment" in raw else default_augment()
    if not isinstance(augment, list):
        raise ConfigError(
            f"config augment must be a list of {{TransformName: {{arguments}}}}, got {augment!r}"
        )
    return Config(augment=augment, **sections).validate()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a raw config dict, in place;
    a key given twice is a ConfigError naming both."""
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"override {item!r} must look like --section.key=value, e.g. --train.epochs=5"
            )
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section in override {item!r}; known: {', '.join(SECTIONS)}"
            )
        if key.removeprefix("--") in given:
            raise ConfigError(
                f"override {key.removeprefix('--')} given twice ({given[key.removeprefix('--')]} "
                f"and {item}); keep one"
            )
        given[key.removeprefix("--")] = item
        try:
            value = _parse_yaml(text) if text else None
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {item!r}: value is not valid YAML ({error.problem})"
            ) from None
        section_values = raw.setdefault(section, {}) or {}
        raw[section] = section_values
        section_values[name] = value
    return raw


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = _parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except DuplicateKey as error:
        raise ConfigError(
            f"config file {path}: {error}; the second would silently replace the first, so keep one"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got {raw!r}")
    return raw


def merge_configs(base: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later`` over ``base``: section by section and key by key; the ``augment`` list, being one
    pipeline, is replaced as a whole. Neither argument is changed."""
    merged = {name: dict(v) if isinstance(v, dict) else v for name, v in base.items()}
    for name, values in later.items():
        if isinstance(values, dict) and isinstance(merged.get(name), dict):
            merged[name].update(values)
        else:
            merged[name] = values
    return merged


def load_raw_config(
    paths: str | Path | Sequence[str | Path] | None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """What the user set: each YAML file of ``paths`` in order (e.g. base, data set, experiment:
    a later file sets only what it changes), then ``overrides``, as nested dicts, before the
    defaults fill the rest and before validation."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge_configs(raw, _read_yaml(Path(path)))
    return apply_overrides(raw, list(overrides))


def load_config(
    paths: str | Path | Sequence[str | Path] | None, overrides: Sequence[str] = ()
) -> Config:
    """The built-in defaults, then each YAML file of ``paths`` in order, then ``overrides``
    (`load_raw_config`); validated."""
    return config_from_dict(load_raw_config(paths, overrides))


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, in the order of the dataclasses (what config.yaml holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from volumetric.atomic_files import atomic_write_text

    atomic_write_text(Path(path), config_to_yaml(config))

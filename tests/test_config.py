"""volumetric.config: defaults, YAML round trip, strict keys and types, overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from volumetric.config import Config, apply_overrides, config_from_dict, load_config, save_config
from volumetric.errors import ConfigError, VolumetricError

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load():
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.model.attention == "seqnorm"
    assert config.model.patch_size == 8
    assert config.train.epochs == 30
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.target_shape is None
    assert [next(iter(entry)) for entry in config.augment] == [
        "RandomFlip",
        "RandomAffine",
        "RandomBiasField",
        "RandomNoise",
    ]
    assert config == Config().validate()  # the built-in defaults, null form options written out


def test_a_config_without_augment_gets_the_default_and_an_empty_one_none(tmp_path):
    """No section: the built-in augmentation; `augment: []` or `augment:` alone: none at all."""
    (tmp_path / "none.yaml").write_text("train: {epochs: 3}\n")
    assert load_config(tmp_path / "none.yaml").augment == Config().augment
    for text in ("augment: []\n", "augment:\n"):
        (tmp_path / "off.yaml").write_text(text)
        assert load_config(tmp_path / "off.yaml").augment == []
    # a later file's empty list turns off an earlier file's augmentation
    (tmp_path / "base.yaml").write_text("augment:\n- RandomFlip: {axes: [0]}\n")
    (tmp_path / "off.yaml").write_text("augment: []\n")
    assert load_config([tmp_path / "base.yaml", tmp_path / "off.yaml"]).augment == []


def test_shipped_default_yaml_equals_builtin_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == Config().validate()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    assert isinstance(load_config(REPO / "configs" / name), Config)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config().validate()


def test_yaml_round_trip(tmp_path):
    raw = {
        "model": {
            "patch_size": [4, 4, 8],
            "embed_dim": 48,
            "depth": 2,
            "num_heads": 4,
            "attention": "softmax",
        },
        "data": {
            "spacing": [1.0, 1.0, 2.5],
            "target_shape": [32, 32, 64],
            "intensity": "ct",
            "ct_window": [-200, 400],
        },
        "augment": [{"RandomFlip": {"axes": [0]}}, {"RandomNoise": {"std": 0.1}}],
        "train": {"epochs": 3, "lr": 0.001, "batch_size": 2, "seed": 7, "device": "cpu"},
    }
    config = load_config(write_yaml(tmp_path / "in.yaml", raw))
    save_config(config, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert again.model.patch_size == [4, 4, 8]
    assert again.data.ct_window == [-200.0, 400.0]
    assert again.augment == raw["augment"]
    # the file is plain YAML, all sections written out, and no temporary file is left behind
    assert set(yaml.safe_load((tmp_path / "out.yaml").read_text())) == {
        "model",
        "data",
        "augment",
        "train",
        "pretrain",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.yaml", "out.yaml"]


def test_unknown_section_raises(tmp_path):
    with pytest.raises(VolumetricError, match="optimizer"):
        load_config(write_yaml(tmp_path / "c.yaml", {"optimizer": {"lr": 1}}))


@pytest.mark.parametrize("section,key", [("train", "epoch"), ("model", "heads"), ("data", "shape")])
def test_unknown_key_raises_naming_it(tmp_path, section, key):
    with pytest.raises(VolumetricError, match=rf"{section}\.{key}"):
        load_config(write_yaml(tmp_path / "c.yaml", {section: {key: 1}}))


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "epochs", "ten"),
        ("train", "epochs", 2.5),
        ("train", "epochs", True),
        ("train", "lr", "fast"),
        ("train", "cache", 1),
        ("model", "embed_dim", [1, 2]),
        ("model", "attention", 3),
        ("data", "target_shape", [16, "x", 16]),
        ("data", "spacing", "1mm"),
    ],
)
def test_wrong_type_raises(tmp_path, section, key, value):
    with pytest.raises(VolumetricError, match=rf"{section}\.{key}"):
        load_config(write_yaml(tmp_path / "c.yaml", {section: {key: value}}))


def test_int_to_float_coercion(tmp_path):
    config = load_config(
        write_yaml(
            tmp_path / "c.yaml", {"train": {"lr": 1, "warmup_epochs": 2}, "data": {"spacing": 2}}
        )
    )
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert isinstance(config.train.warmup_epochs, float)
    assert config.data.spacing == 2  # int | list | None: an int is a valid float
    assert isinstance(config.data.spacing, float)


def test_overrides_apply(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 10, "lr": 0.1}})
    config = load_config(
        path,
        [
            "--train.epochs=3",
            "train.lr=0.002",
            "--model.attention=softmax",
            "--data.target_shape=[16,16,16]",
            "--model.patch_size=4",
        ],
    )
    assert config.train.epochs == 3
    assert config.train.lr == pytest.approx(2e-3) and isinstance(config.train.lr, float)
    assert config.model.attention == "softmax"
    assert config.data.target_shape == [16, 16, 16]
    # untouched values stay
    assert config.train.batch_size == 1


@pytest.mark.parametrize("text", ["1e-3", "5e2"])
def test_override_float_in_scientific_notation(text):
    """`--train.lr=1e-3` is how everyone writes a learning rate. PyYAML (YAML 1.1) reads `1e-3`
    (no dot) as the *string* '1e-3', which the float field then rejects."""
    config = load_config(None, [f"train.lr={text}"])
    assert config.train.lr == pytest.approx(float(text))


def test_yaml_file_float_in_scientific_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5e-2\n")
    config = load_config(path)
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.weight_decay == pytest.approx(5e-2)


def test_override_of_defaults_and_null():
    config = load_config(None, ["--data.spacing=1.5", "--data.target_shape=null"])
    assert config.data.spacing == 1.5
    assert config.data.target_shape is None


def test_overrides_are_checked_like_the_file():
    with pytest.raises(VolumetricError, match="train.bogus"):
        load_config(None, ["--train.bogus=1"])
    with pytest.raises(VolumetricError, match="train.epochs"):
        load_config(None, ["--train.epochs=many"])
    with pytest.raises(VolumetricError, match="nosuch"):
        load_config(None, ["--nosuch.key=1"])


@pytest.mark.parametrize(
    "bad", ["--train.epochs", "--epochs=3", "train=3", "--train.=3", "--train.lr=[1,"]
)
def test_bad_override_syntax_raises(bad):
    with pytest.raises(VolumetricError):
        load_config(None, [bad])


def test_apply_overrides_in_place():
    raw = {"train": None}
    assert apply_overrides(raw, ["train.epochs=2"]) == {"train": {"epochs": 2}}


@pytest.mark.parametrize(
    "patch,shape",
    [
        (8, [16, 16, 12]),
        (4, [16, 16]),
        ([4, 4, 8], [16, 16, 12]),
        (4, [0, 16, 16]),
        (4, [16, 16, 16, 16]),
    ],
)
def test_target_shape_not_a_multiple_raises(patch, shape):
    with pytest.raises(VolumetricError, match="target_shape"):
        config_from_dict({"model": {"patch_size": patch}, "data": {"target_shape": shape}})


def test_target_shape_multiple_of_anisotropic_patch_ok():
    config = config_from_dict(
        {"model": {"patch_size": [4, 4, 8]}, "data": {"target_shape": [16, 12, 16]}}
    )
    assert config.data.target_shape == [16, 12, 16]


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"data": {"intensity": "hu"}}, "intensity"),
        ({"train": {"precision": "fp8"}}, "precision"),
        ({"data": {"ct_window": [100, -100]}}, "ct_window"),
        ({"data": {"ct_window": [1, 2, 3]}}, "ct_window"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"train": {"batch_size": 0}}, "batch_size"),
        ({"train": {"val_fraction": 1.0}}, "val_fraction"),
        ({"train": {"lr": 0}}, "lr"),
        ({"augment": [{"RandomFlip": {}, "RandomNoise": {}}]}, "augment"),
        ({"augment": {"RandomFlip": {}}}, "augment"),
        ({"train": [1, 2]}, "train"),
    ],
)
def test_validation_errors(raw, key):
    with pytest.raises(VolumetricError, match=key):
        config_from_dict(raw)


def test_not_a_mapping_raises(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(VolumetricError, match="mapping"):
        load_config(path)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(VolumetricError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("model: {patch_size: [4,\n")
    with pytest.raises(VolumetricError, match="YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "raw,key",
    [
        # validate() checks target_shape against the patch with zip(), which stops at the shorter list
        ({"model": {"patch_size": [4, 4]}, "data": {"target_shape": [16, 16, 16]}}, "patch_size"),
        ({"model": {"embed_dim": 25, "num_heads": 2}}, "embed_dim"),
    ],
    ids=["two-element-patch", "embed_dim-not-divisible"],
)
def test_model_section_is_validated(raw, key):
    """config.py: "every mistake a user can make is a VolumetricError naming the key". Model values that
    VolumeTransformer rejects are not checked here; they surface later as a bare ValueError (which the
    CLI does not catch either, see test_cli.py::test_error_bad_model_argument_is_one_line)."""
    with pytest.raises(VolumetricError, match=f"model.{key}"):
        config_from_dict(raw)


def test_several_files_merge_in_order(tmp_path):
    """Base, then data set, then experiment: a later file sets only what it changes; the augment
    list is one pipeline and is replaced whole; overrides come last."""
    base = write_yaml(
        tmp_path / "base.yaml",
        {
            "model": {"embed_dim": 96, "num_heads": 4},
            "augment": [{"RandomFlip": {"axes": [0]}}, {"RandomNoise": {}}],
            "train": {"epochs": 50, "lr": 1e-3},
        },
    )
    data = write_yaml(tmp_path / "ct.yaml", {"data": {"intensity": "ct", "spacing": 1.5}})
    experiment = write_yaml(
        tmp_path / "exp.yaml",
        {"train": {"epochs": 5}, "augment": [{"RandomAffine": {"degrees": 5}}]},
    )
    config = load_config([base, data, experiment], ["--train.lr=2e-4"])
    assert (config.model.embed_dim, config.model.num_heads) == (96, 4)
    assert (config.data.intensity, config.data.spacing) == ("ct", 1.5)
    assert (config.train.epochs, config.train.lr) == (5, 2e-4)
    assert config.augment == [{"RandomAffine": {"degrees": 5}}]
    # the order matters: the experiment first, then the base, gives the base's epochs
    assert load_config([experiment, base]).train.epochs == 50
    # one path, as before, and none: the defaults
    assert load_config(base).train.epochs == 50 and load_config([]) == Config().validate()


def test_a_later_file_is_checked_like_the_first(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", {"train": {"epochs": 3}})
    bad = write_yaml(tmp_path / "bad.yaml", {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="unknown config key train.epoch"):
        load_config([base, bad])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config([base, tmp_path / "missing.yaml"])


@pytest.mark.parametrize("old, new", [(True, "memory"), (False, "none")])
def test_old_boolean_cache_setting_is_read(old, new):
    """Configs and last.pt files written before the disk cache said cache: true / false."""
    assert config_from_dict({"train": {"cache": old}}).train.cache == new
    assert Config().train.cache == "disk" and Config().train.num_workers == "auto"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"cache": "ssd"}}, "train.cache"),
        ({"train": {"num_workers": -1}}, "train.num_workers"),
        ({"train": {"num_workers": "many"}}, "train.num_workers"),
        ({"data": {"on_bad_scan": "ignore"}}, "data.on_bad_scan"),
    ],
)
def test_data_loading_settings_are_checked(raw, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "model,key",
    [
        ({"stem": "conv", "patch_size": 6}, "model.stem='conv' needs every patch_size side"),
        ({"stem": "conv", "patch_size": [8, 8, 3]}, "model.stem='conv'"),
        ({"stem": "hybrid"}, "model.stem='hybrid' is not one of"),
        ({"stem": "conv", "stem_norm": "batch"}, "model.stem_norm='batch' is not one of"),
        ({"layer_scale": 0}, "model.layer_scale must be a positive number"),
        ({"layer_scale": -1e-4}, "model.layer_scale must be a positive number"),
        ({"drop_path": 1.0}, "model.drop_path must be in [0, 1)"),
        ({"drop_path": -0.1}, "model.drop_path must be in [0, 1)"),
    ],
)
def test_model_option_errors_name_the_key(model, key):
    with pytest.raises(VolumetricError) as caught:
        config_from_dict({"model": model})
    assert str(caught.value).startswith(f"config {key}")
    assert "\n" not in str(caught.value)


def test_model_options_accept_their_off_and_on_values():
    on = config_from_dict(
        {"model": {"stem": "conv", "layer_scale": 0.1, "drop_path": 0.1, "attention_norm": True}}
    )
    assert (on.model.stem, on.model.layer_scale, on.model.drop_path) == ("conv", 0.1, 0.1)
    off = config_from_dict({"model": {"layer_scale": None, "drop_path": 0}})
    assert off.model.layer_scale is None and off.model.drop_path == 0.0


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("model:\n  depth: 2\ntrain:\n  epochs: 3\nmodel:\n  embed_dim: 48\n", "model", (1, 5)),
        ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n", "epochs", (2, 4)),
    ],
    ids=["section", "key"],
)
def test_a_key_written_twice_is_one_error_naming_both_lines(tmp_path, text, key, lines):
    """PyYAML keeps the second of two equal keys: the first block would be lost without a word."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(VolumetricError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"key {key!r} is written twice, on lines {lines[0]} and {lines[1]}" in message
    assert str(path) in message and "\n" not in message


def test_an_override_given_twice_is_one_error():
    with pytest.raises(VolumetricError, match=r"train.epochs given twice \(--train.epochs=3 and"):
        load_config(None, ["--train.epochs=3", "--model.depth=2", "--train.epochs=5"])
    config = load_config(None, ["--train.epochs=3", "--train.lr=0.001"])  # two keys: fine
    assert (config.train.epochs, config.train.lr) == (3, 0.001)

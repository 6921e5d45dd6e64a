"""Config: overrides with type coercion, clear errors, every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.config import (
    Config,
    ConfigError,
    apply_overrides,
    did_you_mean,
    dump_config,
    load_config,
    suggest,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_override_coercion() -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=1e-2",
            "train.epochs=3",
            "compile=true",
            "optim.betas=[0.8, 0.95]",
            "model.kwargs.hidden=[8,4]",
            "model.kwargs.activation=gelu",
            "train.clip_norm=null",
            "name=my run",
        ],
    )
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.compile is True
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.kwargs == {"hidden": [8, 4], "activation": "gelu"}
    assert cfg.train.clip_norm is None and cfg.name == "my run"


def test_overrides_do_not_mutate_the_source() -> None:
    raw = {"optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=0.2"])
    assert raw == {"optim": {"lr": 0.1}} and out == {"optim": {"lr": 0.2}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr_rate=0.1", "unknown key 'optim.lr_rate'; did you mean 'optim.lr'?"),
        ("optim.name=adamm", "optim.name: Input should be 'sgd', 'adam' or 'adamw' (got 'adamm')"),
        ("optim.name=adamm", "did you mean 'adam'?"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0 (got -1)"),
        (
            "train.accumulate=0",
            "train.accumulate: Input should be greater than or equal to 1 (got 0)",
        ),
        ("train.epochs=three", "train.epochs: Input should be a valid integer"),
        ("precision=fp8", "allowed: fp32, bf16, fp16"),
        ("modle.name=mlp", "unknown key 'modle'; did you mean 'model'?"),
        ("data.name=digitz", "did you mean 'digits'?"),
        ("data.name=csv", "data.name=csv needs data.path"),
        ("device=tpu", "unknown device 'tpu'"),
        ("lr", "override 'lr' is not of the form key=value"),
    ],
)
def test_config_errors_name_the_key_and_fix(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n   name: sgd\n")
    with pytest.raises(ConfigError, match=r"bad YAML in .*bad.yaml at line 3"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_dump_roundtrip_writes_every_default() -> None:
    cfg = load_config(None, ["optim.lr=0.5"])
    text = dump_config(cfg)
    raw = yaml.safe_load(text)
    assert raw["optim"]["lr"] == 0.5 and "weight_decay" in raw["optim"]
    assert Config.model_validate(raw) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize(
    ("word", "choices", "hint"),
    [
        ("lr_rate", ["lr", "momentum"], "did you mean 'lr'? "),  # the choice starts the word
        ("batch", ["batch_size", "epochs"], "did you mean 'batch_size'? "),  # the word starts it
        ("adamm", ["adam", "sgd"], "did you mean 'adam'? "),
        # a typo inside a dotted name is the near-identical name, not its parent module
        ("stages.0.0.brnch.bn1", ["stages.0.0", "stages.0.0.branch.bn1"], "did you mean "),
        ("zzz", ["adam", "sgd"], ""),
    ],
)
def test_did_you_mean_is_one_phrase_before_the_allowed_list(word, choices, hint) -> None:
    got = did_you_mean(word, choices)
    assert got.startswith(hint) and (got == "" or got.endswith("? "))
    if word.startswith("stages"):
        assert got == "did you mean 'stages.0.0.branch.bn1'? "
    assert (suggest(word, choices) is None) == (got == "")


def test_every_unknown_name_message_uses_the_same_phrase() -> None:
    from collections import OrderedDict

    from torch import nn

    from kiln.models.init import init_weights
    from kiln.models.surgery import replace_head
    from kiln.models.trainable import freeze

    parts = {"body": nn.Linear(2, 2), "act": nn.ReLU(), "head": nn.Linear(2, 2)}
    net = nn.Sequential(OrderedDict(parts))
    calls = [
        (lambda: init_weights(net, "kaiming_normall"), "did you mean 'kaiming_normal'? allowed:"),
        (lambda: freeze(net, "haed"), "did you mean 'head'? top-level modules:"),
        (lambda: replace_head(net, 3, name="heads"), "did you mean 'head'? modules:"),
        (lambda: validate_source("digitz"), "did you mean 'digits'? allowed:"),
    ]
    for call, phrase in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert phrase in str(info.value)


def validate_source(name: str) -> None:
    """Build a config whose data source is ``name`` (refused when unknown)."""
    try:
        load_config(None, [f"data.name={name}"])
    except ConfigError as err:
        raise ValueError(str(err)) from err

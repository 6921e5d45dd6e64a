"""Config: overrides with type coercion, clear errors, every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.config import Config, ConfigError, apply_overrides, dump_config, load_config

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

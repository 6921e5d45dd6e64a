"""Typed configuration: the single source of defaults for every Kiln job.

A job is one YAML file (see ``configs/``) plus ``key.sub=value`` overrides from the command line.
Both are validated by the pydantic models below; unknown keys and wrong types are refused with the
dotted path, the bad value, the allowed values and a close-match suggestion, so a typo never
silently falls back to a default.

This module imports no torch, so ``kiln --help`` and ``--print-config`` stay fast.

Example:
    >>> cfg = load_config(None, ["optim.lr=0.01", "train.epochs=3"])
    >>> cfg.optim.lr, cfg.train.epochs
    (0.01, 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from kiln.config import yaml_io as config_yaml
from kiln.config.base import _Strict, suggest
from kiln.config.data import INT32_MAX, MAX_SEED, DataConfig, SyntheticConfig, TextConfig
from kiln.config.messages import format_error
from kiln.config.techniques import (
    EarlyStopConfig,
    EMAConfig,
    FreezeConfig,
    MetaConfig,
    MixConfig,
    SWAConfig,
)
from kiln.errors import KilnError, short_repr

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "EarlyStopConfig",
    "FreezeConfig",
    "LogConfig",
    "LossConfig",
    "MetaConfig",
    "MixConfig",
    "ModelConfig",
    "OptimConfig",
    "SWAConfig",
    "SchedulerConfig",
    "SyntheticConfig",
    "TextConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "suggest",
]


class ConfigError(KilnError, ValueError):
    """A config value or key is wrong; the message says which, why and how to fix it."""


# Weight-init schemes of model.init (kiln.models.init implements each).
InitScheme = Literal[
    "default",
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "orthogonal",
    "normal",
    "zeros",
]


class ModelConfig(_Strict):
    """Which network to build: a registry name or a user class by import path.

    ``kwargs`` go to the model's constructor and are checked against its signature when the
    model is built (``model.kwargs.width=128``).
    """

    name: str = "mlp"
    target: str | None = Field(None, description="'pkg.module:Class' of a user nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: InitScheme = Field(
        "default", description="weight init of Linear/Conv layers; biases zero"
    )
    init_std: float = Field(0.02, gt=0.0, description="std of init=normal")
    zero_init_last: bool = Field(
        False, description="zero the last norm/linear of each residual branch (starts as identity)"
    )
    pretrained: str | None = Field(
        None,
        description="initial weights: a kiln run folder, a .safetensors/.pt state dict, or a "
        "Hugging Face model folder",
    )
    pretrained_exclude: list[str] = Field(
        default_factory=list,
        description="state-dict key globs not loaded (e.g. the old head: ['fc.*'])",
    )
    pretrained_strict: bool = Field(
        True, description="every other key must load with its shape; false loads what matches"
    )
    drop_path: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth: drop rate of the deepest residual block (linear rule)",
    )

    @field_validator("target")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f"model.target must look like 'package.module:ClassName', got {v!r}")
        return v


class OptimConfig(_Strict):
    """Optimizer and its parameter groups."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    no_decay_bias_norm: bool = Field(
        True, description="weight decay off for biases and normalisation weights"
    )
    lr_mult: dict[str, float] = Field(
        default_factory=dict,
        description="parameter-name glob -> LR multiplier, e.g. {'backbone.*': 0.1}",
    )
    layer_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="layer-wise LR decay: the head and last block x1, each earlier block x "
        "this factor (lr_mult entries take precedence)",
    )


class SchedulerConfig(_Strict):
    """Learning-rate schedule.

    ``cosine``, ``warmup_cosine``, ``linear`` and ``onecycle`` are stepped once per optimizer
    update; ``step``, ``multistep`` and ``exponential`` once per epoch (their step sizes and
    milestones are epochs); ``plateau`` once per epoch on the monitored validation metric.
    """

    name: Literal[
        "none",
        "step",
        "multistep",
        "exponential",
        "cosine",
        "warmup_cosine",
        "linear",
        "onecycle",
        "plateau",
    ] = "none"
    step_size: int = Field(10, ge=1, le=INT32_MAX)
    milestones: list[int] = Field(default_factory=lambda: [30, 60])
    gamma: float = Field(0.1, gt=0.0)
    warmup_steps: int = Field(0, ge=0, le=INT32_MAX)
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    min_lr: float = Field(0.0, ge=0.0)
    max_lr: float | None = Field(None, gt=0.0)
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    patience: int = Field(5, ge=0, le=INT32_MAX)
    factor: float = Field(0.1, gt=0.0, lt=1.0)


class LossConfig(_Strict):
    """Training loss; ``auto`` = cross-entropy for classification/LM, MSE for regression.

    ``weighted_cross_entropy`` and ``focal`` take per-class weights (``class_weights``: a list,
    or ``auto`` = inverse train-split class frequencies, normalised to mean 1).
    """

    name: Literal[
        "auto", "cross_entropy", "weighted_cross_entropy", "focal", "mse", "l1", "smooth_l1"
    ] = "auto"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: list[float] | Literal["auto"] | None = Field(
        None, description="per-class weights (focal: alpha); 'auto' = inverse frequencies"
    )
    gamma: float = Field(2.0, ge=0.0, description="focal loss focusing parameter (0 = CE)")
    task_weights: dict[str, float] | None = Field(
        None,
        description="multi-task data: fixed weight per task; unset = learned uncertainty "
        "weights (one log-variance per task, trained with the model)",
    )


class TrainConfig(_Strict):
    """The loop: length, accumulation, clipping, logging cadence."""

    epochs: int = Field(10, ge=1, le=1_000_000)
    max_steps: int | None = Field(
        None, ge=1, le=INT32_MAX, description="train exactly this many updates (overrides epochs)"
    )
    accumulate: int = Field(1, ge=1, le=65536, description="micro-batches per optimizer update")
    clip_norm: float | None = Field(None, gt=0.0)
    clip_value: float | None = Field(None, gt=0.0)
    log_every: int = Field(
        50, ge=1, le=INT32_MAX, description="updates between logged train metrics"
    )
    val_every: int = Field(1, ge=1, le=INT32_MAX, description="epochs between validations")
    top_k: int = Field(5, ge=1, le=100_000, description="k for the top-k accuracy metric")
    activation_checkpointing: bool | list[str] = Field(
        False,
        description="recompute activations in backward: true = the model's blocks, "
        "or a list of module-name globs / class names",
    )
    auto_microbatch: bool = Field(
        False,
        description="on out-of-memory, halve the micro-batch and double accumulation "
        "(same effective batch and result)",
    )
    nonfinite: Literal["stop", "skip", "rollback", "ignore"] = Field(
        "stop",
        description="on a NaN/Inf loss or gradient: stop (save, name the module), skip the "
        "update, rollback (reload the last checkpoint, lower the LR), or ignore",
    )
    rollback_lr_factor: float = Field(0.5, gt=0.0, lt=1.0)
    max_rollbacks: int = Field(3, ge=1, le=1000)
    max_consecutive_skips: int = Field(
        10,
        ge=1,
        le=INT32_MAX,
        description="with nonfinite=skip: stop (exit 2) after this many non-finite updates in a "
        "row, since the run is no longer training",
    )


class CheckpointConfig(_Strict):
    """When to save full-state checkpoints and which to keep."""

    every_n_steps: int | None = Field(None, ge=1, le=INT32_MAX)
    every_epoch: bool = True
    keep_last: int = Field(2, ge=1, le=10_000)
    keep_best: int = Field(1, ge=0, le=10_000)
    monitor: str = "val/loss"
    mode: Literal["auto", "min", "max"] = "auto"


class LogConfig(_Strict):
    """Where and how progress is reported."""

    progress: Literal["auto"] | bool = "auto"
    tensorboard: bool = True


class Config(_Strict):
    """A whole Kiln job. Every field has a default; a YAML file overrides some of them."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds python, numpy and torch")
    deterministic: bool = False
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    allow_fp16_cpu: bool = Field(False, description="run fp16 autocast on CPU (about 100x slower)")
    compile: bool = False
    channels_last: bool = False
    strategy: Literal["auto", "single", "ddp", "fsdp", "dp", "horovod"] = Field(
        "auto", description="auto: ddp under torchrun with several processes, else single"
    )
    sync_batchnorm: bool = False
    detect_anomaly: bool = Field(
        False,
        description="autograd anomaly mode: a NaN in backward names the op and its forward line "
        "(slow; for debugging)",
    )
    resume: str | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    mix: MixConfig = MixConfig()
    ema: EMAConfig = EMAConfig()
    swa: SWAConfig = SWAConfig()
    freeze: FreezeConfig = FreezeConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    meta: MetaConfig = MetaConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        # The run folder is out_dir/name: a name must be one folder, never a path out of out_dir.
        bad = next((c for c in ("/", "\\", "\x00") if c in v), None)
        if not v.strip() or v in (".", "..") or bad is not None or len(v.encode()) > 200:
            why = f"contains {bad!r}" if bad else "must be a non-empty folder name"
            raise ValueError(
                f"the run name {why}; use one folder name such as name=digits_bf16 "
                "(put parent folders in out_dir)"
            )
        return v

    @field_validator("out_dir")
    @classmethod
    def _out_dir(cls, v: str) -> str:
        if not v.strip() or "\x00" in v:
            raise ValueError("out_dir must name a folder, e.g. out_dir=runs (use . for here)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        base = v.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"unknown device {v!r}; allowed: auto, cpu, cuda, cuda:N, mps, xpu")
        return v


# --------------------------------------------------------------------------- helpers


def _parse_value(text: str, key: str) -> Any:
    """Coerce an override's text with YAML rules: 3 -> int, 1e-3 -> float, true -> bool, [1,2].

    Parsed with the config file's limits (size, values through aliases, depth): a command line is
    user input too.
    """
    if text == "":
        return ""
    try:
        return config_yaml.load_text(text, f"override {key}")
    except config_yaml.YamlLimitError as exc:
        raise ConfigError(f"override {key}= value {exc}") from None
    except yaml.YAMLError:
        return text
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ConfigError(f"override {key}= value: {short_repr(str(exc), 120)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (a copy); values are parsed as YAML scalars.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    out = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {short_repr(item)} is not of the form key=value (e.g. optim.lr=0.01)"
            )
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {short_repr(key)} has an empty part")
        if len(parts) > config_yaml.MAX_DEPTH:
            raise ConfigError(
                f"override key {short_repr(key)} is nested deeper than {config_yaml.MAX_DEPTH}"
            )
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = _parse_value(text, key.strip())
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping within the limits of :mod:`kiln.config.yaml_io`.

    Every failure (missing, not a regular file, too large, not UTF-8, bad YAML, too many or too
    deep values, empty) is one clear ConfigError that names the file.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config path is a directory, expected a YAML file: {p}")
    try:
        data = config_yaml.load_text(config_yaml.read_file(p), str(p))
    except config_yaml.YamlLimitError as exc:
        raise ConfigError(f"config file {p} {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"bad YAML in {p}{where}: {problem}") from None
    except ValueError as exc:  # a scalar YAML accepts but Python cannot build (a huge integer)
        raise ConfigError(f"bad value in {p}: {short_repr(str(exc), 120)}") from None
    if data is None:
        raise ConfigError(
            f"config file {p} is empty (or only comments); write the settings to change, or "
            "leave the file out to train the default job"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a YAML file (or defaults) and dotted overrides.

    Example:
        >>> load_config(None, ["precision=bf16"]).precision
        'bf16'

    Raises:
        ConfigError: with every problem found, each naming the dotted key.
    """
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, with Kiln's error messages."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_error(exc, Config)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

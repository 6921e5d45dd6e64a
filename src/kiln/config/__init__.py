"""Typed configuration: pydantic models are the single source of defaults.

A job is YAML plus dotted overrides (``train.epochs=3``), validated into a :class:`Config`;
unknown keys and wrong types are refused with the path and the allowed values.

* :mod:`kiln.config.schema`: the job (:class:`Config`) and its model/optim/train sections,
  loading, overrides and dumping.
* :mod:`kiln.config.data`, :mod:`kiln.config.techniques`: the data and technique sections.
* :mod:`kiln.config.base`: the strict base model and the did-you-mean helpers
  (:func:`suggest`, :func:`did_you_mean`), which every module's messages use.
* :mod:`kiln.config.messages`: validation errors as one readable line per problem.
* :mod:`kiln.config.yaml_io`: YAML reading with size and alias limits.

This package imports no torch.

Example:
    >>> from kiln.config import validate
    >>> validate({"train": {"epochs": 2}}).train.epochs
    2
"""

from kiln.config.base import did_you_mean, suggest
from kiln.config.data import DataConfig, SyntheticConfig, TextConfig
from kiln.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    read_yaml,
    validate,
)
from kiln.config.techniques import (
    EarlyStopConfig,
    EMAConfig,
    FreezeConfig,
    MetaConfig,
    MixConfig,
    SWAConfig,
)

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
    "did_you_mean",
    "dump_config",
    "load_config",
    "read_yaml",
    "suggest",
    "validate",
]

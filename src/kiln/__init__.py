"""Kiln: advanced PyTorch techniques that work together, correctly, on your own model.

The public API is imported lazily (PEP 562 module ``__getattr__``), so ``import kiln`` and
``kiln --help`` do not pay for importing torch until a part is used.

Example:
    >>> import kiln
    >>> kiln.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "kiln.config",
    "ConfigError": "kiln.config",
    "load_config": "kiln.config",
    "Engine": "kiln.train.engine",
    "Precision": "kiln.train.precision",
    "Trainer": "kiln.train.trainer",
    "FitResult": "kiln.train.trainer",
    "TrainingInterrupted": "kiln.train.trainer",
    "evaluate": "kiln.train.trainer",
    "fit": "kiln.api",
    "load_model": "kiln.train.checkpoint.weights",
    "build_optimizer": "kiln.train.optim",
    "build_scheduler": "kiln.train.optim",
    "seed_everything": "kiln.train.reproducibility",
    "DataBundle": "kiln.data.base",
    "DataInfo": "kiln.data.base",
    "build_data": "kiln.data",
    "build_model": "kiln.registry",
}

__all__ = [
    "Config",
    "ConfigError",
    "DataBundle",
    "DataInfo",
    "Engine",
    "FitResult",
    "Precision",
    "Trainer",
    "TrainingInterrupted",
    "__version__",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "load_config",
    "load_model",
    "seed_everything",
]

if TYPE_CHECKING:
    from kiln.api import fit
    from kiln.config import Config, ConfigError, load_config
    from kiln.data import build_data
    from kiln.data.base import DataBundle, DataInfo
    from kiln.registry import build_model
    from kiln.train.checkpoint.weights import load_model
    from kiln.train.engine import Engine
    from kiln.train.optim import build_optimizer, build_scheduler
    from kiln.train.precision import Precision
    from kiln.train.reproducibility import seed_everything
    from kiln.train.trainer import FitResult, Trainer, TrainingInterrupted, evaluate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

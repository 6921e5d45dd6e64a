"""The import paths the README and docs show keep working after code moves inside a package."""

from __future__ import annotations

import importlib

import pytest

DOCUMENTED = [
    ("kiln", ["Config", "Engine", "Trainer", "fit", "load_model", "load_config", "build_data"]),
    ("kiln.config", ["Config", "ConfigError", "load_config", "validate", "did_you_mean"]),
    ("kiln.doctor", ["check", "Finding"]),
    ("kiln.compress.quantize", ["quantize", "load_quantized", "save_quantized"]),
    ("kiln.compress.prune", ["prune_model", "load_pruned", "save_pruned", "sparsity"]),
    ("kiln.deploy.serve", ["ModelServer"]),
    ("kiln.train.checkpoint", ["CheckpointManager", "load_checkpoint", "save_checkpoint"]),
    ("kiln.run", ["read_config", "read_data_info", "status", "run_dir_of"]),
]


@pytest.mark.parametrize(("module", "names"), DOCUMENTED, ids=[m for m, _ in DOCUMENTED])
def test_documented_names_import_from_the_package(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"

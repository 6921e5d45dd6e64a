"""Shared fixtures: fast configs in a temp dir, and a clean environment per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.config import Config, load_config


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """Build a small, fast config (digits flat MLP) writing under ``tmp_path``."""

    def make(*overrides: str, path: str | Path | None = None) -> Config:
        base = [
            f"out_dir={tmp_path / 'runs'}",
            "log.tensorboard=false",
            "log.progress=false",
            "model.name=mlp",
            "model.kwargs.hidden=[32]",
            "train.epochs=2",
            "data.batch_size=64",
        ]
        return load_config(path, [*base, *overrides])

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """One intra-op thread per test process: steadier timings on small shared machines."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, with the reason, where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    """A test that leaves a default process group behind would leak it into the next one."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Put ``os.environ`` back as it was: a variable a test sets must not steer the next one.

    ``monkeypatch.setenv`` already undoes itself; this catches code under test (and tests) that
    write ``os.environ`` directly, such as ``os.environ.setdefault`` in the library.
    """
    saved = dict(os.environ)
    yield
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value

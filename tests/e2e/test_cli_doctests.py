"""The examples in the CLI modules' docstrings run and print what they say (no torch needed)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "kiln.cli.common",
    "kiln.cli.main",
    "kiln.cli.options",
    "kiln.cli.train",
    "kiln.cli.tune",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"no examples in {name}"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"

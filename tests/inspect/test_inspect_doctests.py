"""The examples in kiln.inspect's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "kiln.inspect",
    "kiln.inspect.anomaly",
    "kiln.inspect.hooks",
    "kiln.inspect.plots",
    "kiln.inspect.saliency",
    "kiln.inspect.stats",
    "kiln.inspect.summary",
    "kiln.cli.inspect",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"

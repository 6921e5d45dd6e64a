"""build_data: dispatch, layout resolution, light imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kiln.data
from kiln.config import DataConfig
from kiln.data import build_data


def test_unknown_layout_argument() -> None:
    with pytest.raises(ValueError, match="layout must be 'flat' or 'image'"):
        build_data(DataConfig(), seed=0, layout="grid")


def test_tables_ignore_the_callers_image_preference() -> None:
    assert build_data(DataConfig(name="sklearn:iris"), seed=0, layout="image").info.input_shape == (
        4,
    )


def test_explicit_layout_a_source_cannot_give_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"data\.layout=image is not available for data\.name=sklearn:iris"
    ):
        build_data(DataConfig(name="sklearn:iris", layout="image"), seed=0)


def test_unknown_source_bypassing_validation() -> None:
    cfg = DataConfig.model_construct(name="nope")
    with pytest.raises(ValueError, match="unknown data source 'nope'"):
        build_data(cfg, seed=0)


def test_importing_kiln_data_does_not_import_sklearn_or_pillow() -> None:
    # Statically: no module-level import of the heavy libraries in any data module.
    folder = Path(kiln.data.__file__).parent
    for file in folder.glob("*.py"):
        tree = ast.parse(file.read_text())
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            heavy = [n for n in names if n.split(".")[0] in ("sklearn", "PIL")]
            assert not heavy, f"{file.name} imports {heavy} at module level"

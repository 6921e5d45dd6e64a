"""User errors at the CLI that no single area owns: one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from runners import run_kiln
from training import train_digits_mlp


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits_mlp(tmp_path_factory.mktemp("runs"))


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_consolidate_into_a_missing_folder(run_dir: Path, tmp_path: Path):
    target = tmp_path / "missing" / "dir" / "w.safetensors"
    line = _one_line_error(run_kiln("consolidate", str(run_dir), "--out", str(target)))
    assert str(target.parent) in line and "does not exist" in line
    assert not target.parent.exists()

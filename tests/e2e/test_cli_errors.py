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


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "RUN", "--port", "abc"], "kiln serve: Invalid value for '--port'"),
        (["train", "configs/digits.yaml", "--bogus"], "kiln train: No such option: --bogus"),
        (["nosuchverb"], "kiln: No such command 'nosuchverb'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], says: str) -> None:
    # typer draws a box around these; Kiln prints them like every other error.
    out = run_kiln(*args, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"error: {says}"), out.stderr
    assert "-h`" in lines[0] and "\u256d" not in out.stderr  # the fix, and no box


def test_export_out_given_a_file_name_is_refused(tmp_path: Path) -> None:
    # --out is a folder; "model.onnx" used to become a folder named model.onnx.
    target = tmp_path / "model.onnx"
    out = run_kiln("export", str(tmp_path / "run"), "--out", str(target), timeout=60)
    assert out.returncode == 2, out.stderr
    assert "--out names a folder" in out.stderr and f"--out {tmp_path / 'model'}" in out.stderr
    assert not target.exists()

"""``kiln.deploy.export``: TorchScript, torch.export and ONNX files that match the eager model."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from runners import ROOT, run_kiln
from torch import nn

from kiln.algorithms.ensemble import load_ensemble
from kiln.config import load_config
from kiln.deploy.export import (
    FORMATS,
    ParityError,
    check_format,
    export_model,
    export_runs,
    load_exported,
)
from kiln.train.trainer import Trainer

COMMON = ["train.epochs=1", "log.tensorboard=false", "log.progress=false"]


def _train(out: Path, config: str, name: str, *extra: str) -> Path:
    overrides = [f"out_dir={out}", f"name={name}", *COMMON, *extra]
    return Trainer(load_config(ROOT / config, overrides), verbose=False).fit().run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny digits MLPs (different seeds) and a tiny digits ResNet, one epoch each."""
    out = tmp_path_factory.mktemp("export-runs")
    mlp = ("model.kwargs.hidden=[32]",)
    return {
        "mlp": _train(out, "configs/digits_mlp.yaml", "mlp", *mlp),
        "mlp2": _train(out, "configs/digits_mlp.yaml", "mlp2", "seed=1", *mlp),
        "resnet": _train(
            out, "configs/digits.yaml", "resnet", "model.kwargs.depths=[1]", "model.kwargs.width=4"
        ),
    }


def _check_manifest(folder: Path, fmt: str, sources: list[Path]) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == fmt and (folder / str(manifest["file"])).is_file()
    assert manifest["parity_ok"] is True
    assert [p["batch"] for p in manifest["parity"]] == [1, 64]
    for p in manifest["parity"]:
        assert p["max_abs"] < 1e-4 and p["ok"] is True
    assert manifest["input"]["shape"][0] == "batch" and manifest["input"]["dtype"] == "float32"
    assert manifest["output"]["shape"] == ["batch", 10]
    assert manifest["torch"] == torch.__version__ and manifest["kiln"] == "0.1.0"
    assert manifest["sources"] == [str(s) for s in sources]
    return manifest


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["mlp", "resnet"])
def test_each_format_matches_eager(
    runs: dict[str, Path], tmp_path: Path, fmt: str, which: str
) -> None:
    if fmt == "torchscript" and which == "resnet":
        # The ResNet's forward is not scriptable (an f-string): traced, with a warning.
        with pytest.warns(UserWarning, match="torch.jit.script failed"):
            result = export_runs([runs[which]], format=fmt, out=tmp_path)
    else:
        result = export_runs([runs[which]], format=fmt, out=tmp_path)
    manifest = _check_manifest(tmp_path, fmt, [runs[which]])
    assert result.path.name == manifest["file"] and result.bytes > 0
    if fmt == "torchscript":
        assert result.notes["method"] == ("script" if which == "mlp" else "trace")
    if which == "resnet":
        assert manifest["input"]["shape"] == ["batch", 1, 32, 32]


def test_default_folder_is_under_the_run(runs: dict[str, Path]) -> None:
    result = export_runs([runs["mlp"]], format="exported", batch_sizes=(1, 7))
    assert result.path == runs["mlp"] / "export" / "exported" / "model.pt2"


def test_fused_export_matches_the_unfused_model(runs: dict[str, Path], tmp_path: Path) -> None:
    result = export_runs([runs["resnet"]], format="exported", fuse=True, out=tmp_path)
    manifest = _check_manifest(tmp_path, "exported", [runs["resnet"]])
    options = manifest["options"]
    assert isinstance(options, dict) and options["fuse"] is True and "bn" in options["fused"]
    assert all(p.ok for p in result.parity)


def test_pt2_loads_without_kiln(runs: dict[str, Path], tmp_path: Path) -> None:
    export_runs([runs["resnet"]], format="exported", out=tmp_path)
    x = torch.randn(5, 1, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    eager = load_ensemble([runs["resnet"]]).members[0]
    with torch.no_grad():
        torch.save(eager(x), tmp_path / "y.pt")
    code = (
        "import sys, torch\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]\n"
        "d = sys.argv[1]\n"
        "m = torch.export.load(d + '/model.pt2').module()\n"
        "y = m(torch.load(d + '/x.pt'))\n"
        "print(float((y - torch.load(d + '/y.pt')).abs().max()), 'kiln' in sys.modules)\n"
    )
    # -I: isolated mode, no PYTHONPATH and no script directory on sys.path.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    diff, imported = proc.stdout.split()
    assert float(diff) < 1e-5 and imported == "False"


@pytest.mark.parametrize("fmt", ["exported", "onnx"])
def test_ensemble_of_two_runs_is_one_model(runs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    pair = [runs["mlp"], runs["mlp2"]]
    result = export_runs(pair, format=fmt, out=tmp_path)
    manifest = _check_manifest(tmp_path, fmt, pair)
    assert isinstance(manifest["options"], dict) and manifest["options"]["ensemble"] is True
    x = torch.randn(9, 64)
    with torch.no_grad():
        expected = load_ensemble(pair)(x)
    got = load_exported(result.path, fmt)(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_bad_format_lists_the_allowed_ones(runs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="torchscript, exported, onnx"):
        check_format("tflite")
    with pytest.raises(ValueError, match="choose one of torchscript, exported, onnx"):
        export_runs([runs["mlp"]], format="savedmodel")


class _Unscriptable(nn.Module):
    """A forward TorchScript cannot compile (an f-string), so it is traced instead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2, f"expected (batch, 4), got {tuple(x.shape)}"
        return self.fc(x)


def test_torchscript_falls_back_to_trace_with_a_warning(tmp_path: Path) -> None:
    x = torch.randn(10, 4)
    with pytest.warns(UserWarning, match=r"torch\.jit\.script failed \(.+\); .*torch\.jit\.trace"):
        result = export_model(_Unscriptable(), x, tmp_path, format="torchscript")
    assert result.notes["method"] == "trace" and result.notes["script_error"]
    assert all(p.ok for p in result.parity)


class _DataDependent(_Unscriptable):
    """Data-dependent control flow: tracing freezes the branch its example input took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2, f"expected (batch, 4), got {tuple(x.shape)}"
        if x.sum() > 0:
            return self.fc(x) * 2
        return self.fc(x)


def test_parity_failure_says_what_differed(tmp_path: Path) -> None:
    # The example (first two rows) takes the positive branch; the batch of 64 does not.
    x = torch.cat([torch.ones(2, 4), -torch.ones(8, 4)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ParityError, match="at batch 64: max abs"):
            export_model(_DataDependent(), x, tmp_path, format="torchscript")
    assert any("torch.jit.script failed" in str(w.message) for w in seen)
    assert json.loads((tmp_path / "manifest.json").read_text())["parity_ok"] is False


@pytest.mark.slow
def test_cli_exports_onnx(runs: dict[str, Path]) -> None:
    proc = run_kiln("export", str(runs["mlp"]), "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    assert "model.onnx" in proc.stdout and "max abs" in proc.stdout
    assert (runs["mlp"] / "export" / "onnx" / "manifest.json").is_file()
    bad = run_kiln("export", str(runs["mlp"]), "--format", "tflite")
    assert bad.returncode == 2 and "torchscript, exported, onnx" in bad.stderr

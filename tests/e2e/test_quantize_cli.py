"""``kiln quantize`` end to end on a tiny run trained here: table, report.json, saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runners import ROOT, run_kiln

from kiln.compress.quantize.core import load_quantized
from kiln.config import load_config
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped digits MLP (two hidden layers of 256), 3 epochs, trained once here."""
    out = tmp_path_factory.mktemp("qcli")
    overrides = [
        "log.tensorboard=false",
        "log.progress=false",
        f"out_dir={out}",
        "name=mlp",
        "train.epochs=3",
    ]
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", overrides)
    return Trainer(cfg, verbose=False).fit().run_dir


@pytest.mark.slow
def test_static_prints_the_table_and_saves_a_reloadable_model(run: Path) -> None:
    proc = run_kiln("quantize", str(run), "--method", "static", "--calib-batches", "4")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # the torch.ao deprecations are filtered
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == ["model", "fp32", "static"]
    folder = run / "quantized" / "static"
    report = json.loads((folder / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["fp32", "static"]
    fp32, int8 = report["rows"]
    assert fp32["size_bytes"] / int8["size_bytes"] > 3  # int8 weights, same metadata
    assert abs(int8["metrics"]["acc"] - fp32["metrics"]["acc"]) <= 0.02
    assert fp32["latency_b1_ms"] > 0 and int8["latency_b64_ms"] > 0
    assert report["reload_max_abs_diff"] == 0.0
    assert report["calib_batches"] == 4 and report["threads"] == 1
    again = load_quantized(folder)  # rebuilt from the config saved with it
    x = torch.randn(8, 64)
    with torch.inference_mode():
        diff = (again(x) - load_model(run)(x)).abs().max()
    assert 0 < diff < 0.5  # int8, close to fp32


@pytest.mark.slow
def test_qat_fine_tunes_and_writes_to_an_out_folder(run: Path, tmp_path: Path) -> None:
    proc = run_kiln(
        "quantize", str(run), "--method", "qat", "--qat-epochs", "1", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    assert "qat fine-tune: optim.lr" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "qat" and report["qat_epochs"] == 1
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "qat_metrics.jsonl").is_file()
    assert report["rows"][1]["metrics"]["acc"] > 0.8


def test_bad_method_lists_the_allowed_ones(run: Path) -> None:
    proc = run_kiln("quantize", str(run), "--method", "int4")
    assert proc.returncode == 2
    assert "allowed: dynamic, static, qat, pt2e, onnx-int8" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_onnx_int8_file_is_reloaded_and_checked(run: Path, tmp_path: Path) -> None:
    # Not only the torch.ao methods: the saved .onnx is read back by a new ORT session.
    proc = run_kiln(
        "quantize",
        str(run),
        "--method",
        "onnx-int8",
        "--calib-batches",
        "2",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reload_max_abs_diff"] == 0.0
    assert "reloaded from disk: max abs output difference 0" in proc.stdout

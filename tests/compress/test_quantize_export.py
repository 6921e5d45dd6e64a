"""Int8 through export: PT2E (torchao + Inductor freezing) and ONNX Runtime (dynamic, static QDQ).

One digits MLP is trained for the module (3 epochs, a few seconds); every method must keep its
test accuracy within 1 point of fp32, save a file that loads back to the same outputs, and
accept any batch size. The ONNX int8 file of this Linear-only model must be >= 3x smaller than
the fp32 ONNX file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from runners import ROOT
from torch import nn

from kiln.compress.quantize.onnx import ONNX_INT8_FILE, quantize_onnx_int8
from kiln.compress.quantize.pt2e import PT2E_FILE, load_pt2e, quantize_pt2e
from kiln.compress.report import score
from kiln.config import load_config
from kiln.deploy.onnx import export_onnx, onnx_predict, onnx_session
from kiln.train.build import build_data_for, loader_for
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A digits MLP (64-256-256-10) trained 3 epochs, its loaders and its fp32 accuracy."""
    out = tmp_path_factory.mktemp("quantize-export")
    overrides = [f"out_dir={out}", "train.epochs=3", "log.tensorboard=false", "log.progress=false"]
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", overrides)
    run_dir = Trainer(cfg, verbose=False).fit().run_dir
    model = load_model(run_dir)
    data = build_data_for(cfg)
    assert data.test is not None
    test = loader_for(cfg, data.test, train=False, device=CPU)
    calib = loader_for(cfg, data.train, train=False, device=CPU)
    example = next(iter(test))[0]
    fp32 = score(model, test, "classification")["acc"]
    assert fp32 > 0.85  # the model learned something, so the accuracy checks below mean something
    return {
        "model": model,
        "run_dir": run_dir,
        "test": test,
        "calib": calib,
        "example": example,
        "fp32_acc": fp32,
    }


def _acc(predict: Any, loader: Any) -> float:
    return score(predict, loader, "classification")["acc"]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_onnx_int8_keeps_accuracy_and_round_trips(
    digits: dict[str, Any], static: bool, tmp_path: Path
) -> None:
    q = quantize_onnx_int8(digits["model"], digits["calib"], digits["example"], static=static)
    assert q.method == "onnx-int8" and q.module is None
    assert abs(_acc(q.predict, digits["test"]) - digits["fp32_acc"]) <= 0.01

    ops = q.notes["ops"]
    if static:  # QDQ: weights and activations carry (de)quantize nodes around fp32 Gemm
        assert ops.get("QuantizeLinear", 0) >= 3 and ops.get("DequantizeLinear", 0) >= 6
        assert 1 <= q.notes["calib_batches"] <= 32
    else:  # every Linear became an integer MatMul
        assert ops.get("MatMulInteger", 0) == 3

    path = q.save(tmp_path)
    assert path == tmp_path / ONNX_INT8_FILE and q.files == [path]
    assert path.stat().st_size == q.notes["int8_onnx_bytes"]
    reloaded = onnx_predict(onnx_session(path))
    x = digits["example"]
    torch.testing.assert_close(reloaded(x), q.predict(x), rtol=0, atol=0)


def test_onnx_int8_is_3x_smaller_than_fp32_onnx(digits: dict[str, Any], tmp_path: Path) -> None:
    fp32 = export_onnx(digits["model"], digits["example"], tmp_path / "fp32.onnx")
    assert not list(tmp_path.glob("*.data"))  # weights inside the one file
    q = quantize_onnx_int8(digits["model"], digits["calib"], digits["example"])
    int8 = q.save(tmp_path / "int8")
    assert fp32.stat().st_size == q.notes["fp32_onnx_bytes"]
    assert fp32.stat().st_size >= 3 * int8.stat().st_size


def test_onnx_fp32_matches_eager_at_any_batch(digits: dict[str, Any], tmp_path: Path) -> None:
    model, x = digits["model"], digits["example"]
    predict = onnx_predict(onnx_session(export_onnx(model, x, tmp_path / "m.onnx")))
    with torch.inference_mode():
        for n in (1, 7, len(x)):
            torch.testing.assert_close(predict(x[:n]), model(x[:n]), rtol=1e-4, atol=1e-5)


def test_onnx_static_needs_calibration_batches(digits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="calibration loader is empty"):
        quantize_onnx_int8(digits["model"], [], digits["example"], static=True)
    with pytest.raises(ValueError, match="calib_batches must be >= 1"):
        quantize_onnx_int8(
            digits["model"], digits["calib"], digits["example"], static=True, calib_batches=0
        )


@pytest.mark.slow  # torch.compile of the int8 program: a few seconds with a warm Inductor cache
def test_pt2e_keeps_accuracy_and_round_trips(digits: dict[str, Any], tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    freezing_before = inductor_config.freezing
    model, x = digits["model"], digits["example"]
    q = quantize_pt2e(model, digits["calib"], x, calib_batches=8)
    assert inductor_config.freezing == freezing_before  # scoped to the compilation only
    assert q.method == "pt2e" and q.notes["dynamic_batch"] and q.notes["calib_batches"] == 8
    assert q.notes["compiled"] == "dynamic batch" and q.notes["messages"] == []
    assert abs(_acc(q.predict, digits["test"]) - digits["fp32_acc"]) <= 0.01

    # Any batch size, views or not, runs the graphs compiled (frozen) at quantization time:
    # a graph compiled later, outside the freezing scope, would be no faster than fp32.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert q.module is not None
    for n in (1, 7, len(x)):
        for batch in (x[:n], x[:n].clone()):
            out = q.predict(batch)
            assert out.shape == (n, 10)
            with torch.no_grad():
                torch.testing.assert_close(out, q.module(batch), rtol=1e-3, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.inference_mode():  # an inference tensor is a new signature: compiled frozen too
        batch = x[:5].clone()
        torch.testing.assert_close(q.predict(batch), q.module(batch), rtol=1e-3, atol=1e-3)

    path = q.save(tmp_path)
    assert path == tmp_path / PT2E_FILE and q.files == [path]
    # int8 weights only: the fp32 copies convert_pt2e leaves behind are not saved.
    assert path.stat().st_size * 2 < (digits["run_dir"] / "model.safetensors").stat().st_size
    reloaded = load_pt2e(path)
    with torch.inference_mode():
        for n in (1, 5):
            torch.testing.assert_close(reloaded(x[:n]), q.module(x[:n]), rtol=0, atol=0)


def test_pt2e_without_torchao_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    net = nn.Linear(4, 2)
    with pytest.raises(ImportError, match="pip install torchao"):
        quantize_pt2e(net, [torch.randn(2, 4)], torch.randn(2, 4))
    (tmp_path / PT2E_FILE).write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torchao"):
        load_pt2e(tmp_path / PT2E_FILE)


def test_onnx_without_onnxruntime_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnx onnxscript onnxruntime"):
        quantize_onnx_int8(nn.Linear(4, 2), [], torch.randn(2, 4))

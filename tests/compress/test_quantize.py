"""torch.ao quantization flows on trained digits runs: accuracy, size, reload, bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from runners import ROOT
from safetensors import safe_open
from torch import nn

from kiln.compress.quantize.ao import qat_config, trainer_finetune
from kiln.compress.quantize.core import METHODS, load_quantized, quantize
from kiln.compress.report import CompressedModel, file_size, score
from kiln.config import Config, load_config
from kiln.data.base import DataBundle
from kiln.train.build import build_data_for, loader_for
from kiln.train.checkpoint.weights import WEIGHTS, load_model
from kiln.train.trainer import Trainer

QUIET = ["log.tensorboard=false", "log.progress=false"]
CPU = torch.device("cpu")


@dataclass
class Run:
    """A trained run and what the quantizers need from it."""

    dir: Path
    cfg: Config
    data: DataBundle
    model: nn.Module
    calib: Any
    test: Any
    example: torch.Tensor
    metadata: dict[str, str]

    def acc(self, predict: Any) -> float:
        return score(predict, self.test, "classification")["acc"]


def _train(out: Path, config: str, overrides: list[str]) -> Run:
    cfg = load_config(ROOT / "configs" / config, [*QUIET, f"out_dir={out}", *overrides])
    run_dir = Trainer(cfg, verbose=False).fit().run_dir
    data = build_data_for(cfg)
    test = loader_for(cfg, data.test, train=False, device=CPU)  # type: ignore[arg-type]
    with safe_open(str(run_dir / WEIGHTS), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("kiln_")}
    return Run(
        dir=run_dir,
        cfg=cfg,
        data=data,
        model=load_model(run_dir),
        calib=loader_for(cfg, data.train, train=True, device=CPU),
        test=test,
        example=next(iter(test))[0][:64],
        metadata=meta,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The digits MLP (its shipped config) and a small digits ResNet (bf16, as shipped)."""
    out = tmp_path_factory.mktemp("quant")
    return {
        "mlp": _train(out, "digits_mlp.yaml", ["name=mlp", "train.epochs=6"]),
        "resnet": _train(
            out,
            "digits.yaml",
            [
                "name=resnet",
                "model.kwargs.depths=[1,1]",
                "model.kwargs.width=8",
                "data.image_size=8",
                "train.epochs=8",
                "optim.lr=0.01",
            ],
        ),
    }


def _quantize(run: Run, method: str, **kw: Any) -> CompressedModel:
    return quantize(
        run.model,
        method,
        calib_loader=run.calib,
        example=run.example,
        calib_batches=8,
        metadata=run.metadata,
        **kw,
    )


def _reloads_identically(result: CompressedModel, folder: Path, x: torch.Tensor, **kw: Any) -> None:
    path = result.save(folder)
    assert result.files == [path]
    again = load_quantized(folder, **kw)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), result.predict(x), atol=0, rtol=0)


def test_fp32_runs_are_good_enough_to_compare(runs: dict[str, Run]) -> None:
    for run in runs.values():
        assert run.acc(run.model) > 0.93


def test_dynamic_mlp_keeps_accuracy_and_shrinks(runs: dict[str, Run], tmp_path: Path) -> None:
    run = runs["mlp"]
    result = _quantize(run, "dynamic")
    assert result.notes["quantized"] == {"Linear": 3}
    assert abs(run.acc(result.predict) - run.acc(run.model)) <= 0.01
    _reloads_identically(result, tmp_path, run.example)
    ratio = file_size(run.dir / WEIGHTS) / file_size(result.files)
    assert ratio >= 3.5, ratio
    with safe_open(str(result.files[0]), "pt") as f:  # int8 weights, no pickle anywhere
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert torch.int8 in dtypes


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_static_keeps_accuracy_and_reloads(runs: dict[str, Run], tmp_path: Path, name: str) -> None:
    run = runs[name]
    result = _quantize(run, "static")
    assert result.notes["mode"] == "fx"
    assert result.notes["float_layers"] == {}  # every Conv/Linear became int8
    assert abs(run.acc(result.predict) - run.acc(run.model)) <= 0.01
    if name == "resnet":
        assert result.notes["fused"]["counts"] == {"conv-bn-relu": 3, "conv-bn": 3}
    _reloads_identically(result, tmp_path, run.example)  # rebuilt from the saved config


def test_qat_resnet_fine_tunes_through_the_trainer(runs: dict[str, Run], tmp_path: Path) -> None:
    run = runs["resnet"]
    cfg, changes = qat_config(run.cfg, epochs=1)
    assert cfg.precision == "fp32" and cfg.optim.lr == pytest.approx(run.cfg.optim.lr / 10)
    assert any(c.startswith("precision: 'bf16' -> 'fp32'") for c in changes)
    result = _quantize(run, "qat", finetune=trainer_finetune(cfg, run.data, keep=tmp_path))
    assert (tmp_path / "qat_metrics.jsonl").is_file()
    assert result.notes["float_layers"] == {}
    assert abs(run.acc(result.predict) - run.acc(run.model)) <= 0.01
    _reloads_identically(result, tmp_path / "model", run.example)


def test_qat_config_overrides_what_does_not_fit_a_qat_model() -> None:
    cfg = load_config(
        None, ["ema.enabled=true", "swa.enabled=true", "compile=true", "freeze.modules=[fc]"]
    )
    qcfg, changes = qat_config(cfg, epochs=3, lr_factor=0.5)
    assert (qcfg.train.epochs, qcfg.ema.enabled, qcfg.swa.enabled, qcfg.compile) == (
        3,
        False,
        False,
        False,
    )
    assert qcfg.freeze.modules == [] and qcfg.optim.lr == pytest.approx(cfg.optim.lr / 2)
    said = " ".join(changes)
    for key in ("ema.enabled", "swa.enabled", "compile", "freeze.modules", "optim.lr"):
        assert key in said


class SeqModel(nn.Module):
    """LSTM + GRU + Linear: the three layer kinds dynamic quantization covers."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, num_layers=2)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gru(self.lstm(x)[0])[0][:, -1])


def test_dynamic_lstm_gru_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SeqModel().eval()
    result = quantize(model, "dynamic")
    assert result.notes["quantized"] == {"LSTM": 1, "GRU": 1, "Linear": 1}
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(result.predict(x), model(x), atol=0.05, rtol=0)
    _reloads_identically(result, tmp_path, x, model=SeqModel())
    with pytest.raises(ValueError, match="no Kiln config"):
        load_quantized(tmp_path)  # a user's class: Kiln cannot rebuild it alone


class Branchy(nn.Module):
    """Untraceable (control flow on a tensor value), with a Conv-BN-ReLU Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.flatten(1))


def test_static_falls_back_to_eager_for_untraceable_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.rand(32, 1, 8, 8)
    result = quantize(model, "static", calib_loader=[x], example=x)
    assert result.notes["mode"] == "eager"
    assert result.notes["quantized"] == {"ConvReLU2d": 1, "Linear": 1}
    message = result.notes["messages"][0]
    assert "cannot trace Branchy" in message and "eager mode" in message
    assert "torch.where" in message
    with torch.inference_mode():
        ref = model(x)
        assert (result.predict(x) - ref).abs().max() < 0.05 * ref.abs().max()
    _reloads_identically(result, tmp_path, x, model=Branchy())
    with pytest.raises(ValueError, match="QAT needs graph mode"):
        quantize(model, "qat", example=x, finetune=lambda m: None)


def test_bad_input_names_the_layers_and_the_methods() -> None:
    convs = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(6)], nn.ReLU())
    with pytest.raises(ValueError, match=r"no Linear/LSTM/GRU layer to quantize; found: Conv2d x6"):
        quantize(convs, "dynamic")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"no Conv1d/Conv2d/Conv3d/Linear layer.*found: ReLU x1"):
        quantize(nn.Sequential(nn.ReLU()), "static", calib_loader=[x], example=x)
    with pytest.raises(ValueError, match="allowed: dynamic, static, qat, pt2e, onnx-int8"):
        quantize(convs, "int4")
    with pytest.raises(ValueError, match="did you mean 'static'"):
        quantize(convs, "statc")
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize(nn.Linear(3, 2), "static", example=x)


def test_export_methods_route_to_pt2e_and_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.compress.quantize import onnx as onnx_int8
    from kiln.compress.quantize import pt2e as pt2e_int8

    calls: list[tuple[str, Any]] = []

    def pt2e(model: nn.Module, calib: list[Any], example: Any, *, calib_batches: int) -> str:
        calls.append(("pt2e", (len(calib), calib_batches)))
        return "p"

    def onnx(model: nn.Module, calib: Any, example: Any, *, static: bool, **kw: Any) -> str:
        calls.append(("onnx", static))
        return "o"

    monkeypatch.setattr(pt2e_int8, "quantize_pt2e", pt2e)
    monkeypatch.setattr(onnx_int8, "quantize_onnx_int8", onnx)
    x = torch.randn(4, 3)
    batches = [(x, None)] * 10
    model, conv = nn.Linear(3, 2), nn.Conv1d(1, 1, 1)
    assert quantize(model, "pt2e", calib_loader=batches, example=x, calib_batches=3) == "p"
    assert quantize(model, "onnx-int8", calib_loader=batches, example=x, onnx_static=True) == "o"
    quantize(model, "onnx-int8", calib_loader=batches, example=x)  # Linear only: dynamic
    quantize(conv, "onnx-int8", calib_loader=batches, example=x)  # convolutions: static
    assert calls == [("pt2e", (3, 3)), ("onnx", True), ("onnx", False), ("onnx", True)]
    assert set(METHODS) == {"dynamic", "static", "qat", "pt2e", "onnx-int8"}

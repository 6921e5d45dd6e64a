"""``kiln inspect`` end to end on a tiny run trained here, on a config, and on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from runners import ROOT, run_kiln

from kiln.cli.errors import run_cli
from kiln.cli.inspect import run_inspect, split_inspect_options
from kiln.config import load_config
from kiln.models.summary import count_parameters
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

DIGITS = str(ROOT / "configs" / "digits.yaml")
SMALL = ["model.kwargs.depths=[1]", "model.kwargs.width=4", "data.eval_batch_size=32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped digits ResNet shrunk to one block of width 4, one epoch, trained once here."""
    out = tmp_path_factory.mktemp("inspect")
    overrides = [
        "log.tensorboard=false",
        "log.progress=false",
        f"out_dir={out}",
        "name=tiny",
        "train.epochs=1",
        *SMALL,
    ]
    return Trainer(load_config(DIGITS, overrides), verbose=False).fit().run_dir


@pytest.mark.slow
def test_inspect_a_run_with_grad_cam(run: Path) -> None:
    proc = run_kiln("inspect", str(run), "--saliency", "3", "--method", "gradcam")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(trained weights); eval mode" in out
    assert "batch: 32 test examples, input [32, 1, 32, 32]" in out
    for needle in ("output shape", "MACs", "stages.0.0.branch.conv1", "dead", "grad std"):
        assert needle in out, needle
    assert "non-finite: none" in out
    assert "saliency (gradcam, layer stages.0.0): 3 test examples" in out
    folder = run / "inspect"
    report = json.loads((folder / "inspect.json").read_text())
    assert report["files"] == [
        "activations.png",
        "gradients.png",
        "saliency-gradcam-1.png",
        "inspect.json",
    ]
    for name in report["files"][:-1]:
        with Image.open(folder / name) as img:
            assert img.format == "PNG"
    assert report["source"] == {
        "kind": "run",
        "path": str(run),
        "trained": True,
        "weights": str(run / "model.safetensors"),
    }
    model = load_model(run)
    assert report["summary"]["total_params"] == count_parameters(model).total
    fc = next(r for r in report["summary"]["rows"] if r["name"] == "fc")
    assert fc["macs"] == 32 * 4 * 10 and fc["output_shape"] == [32, 10]
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert [layer["name"] for layer in report["layers"]] == leaves
    relu = next(x for x in report["layers"] if x["name"] == "stem.2")
    assert relu["activation"]["zero_fraction"] > 0 and relu["gradient"]["shape"] == [32, 4, 32, 32]
    assert report["nonfinite"] is None and report["batch"]["loss"] > 0
    sal = report["saliency"]
    assert sal["method"] == "gradcam" and sal["layer"] == "stages.0.0"
    assert [s["index"] for s in sal["samples"]] == [0, 1, 2]


@pytest.mark.slow
def test_inspect_an_untrained_config_with_smoothgrad_and_anomaly_mode(tmp_path: Path) -> None:
    proc = run_kiln(
        "inspect",
        DIGITS,
        "model.name=mlp",
        "model.kwargs={hidden: [16]}",
        "data.layout=flat",
        "inspect.anomaly=true",
        "inspect.batch=10",
        "inspect.samples=4",
        "--saliency",
        "2",
        "--method",
        "smoothgrad",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained: built from the config, no weights" in proc.stdout
    assert "train mode" in proc.stdout and "anomaly mode: the backward pass is clean" in proc.stdout
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["source"]["trained"] is False and report["batch"]["size"] == 10
    assert report["anomaly"] == {"enabled": True, "error": None}
    assert report["saliency"]["options"]["samples"] == 4
    assert (tmp_path / "saliency-smoothgrad-1.png").is_file()


@pytest.mark.slow
def test_grad_cam_on_a_model_without_convolutions_is_one_clear_error(tmp_path: Path) -> None:
    proc = run_kiln(
        "inspect", DIGITS, "model.name=mlp", "model.kwargs={hidden: [16]}", "data.layout=flat",
        "--saliency", "2", "--method", "gradcam", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Grad-CAM needs a convolutional layer and MLP has none")
    assert "--method gradient, grad_x_input or smoothgrad" in proc.stderr
    assert not (tmp_path / "inspect.json").exists()


@pytest.mark.parametrize(
    ("args", "options", "needle"),
    [
        ([DIGITS], {"method": "lime", "saliency": 1}, "allowed: gradient, grad_x_input"),
        ([DIGITS], {"method": "gradcam"}, "--method gradcam needs --saliency N"),
        ([DIGITS], {"saliency": -1}, "--saliency must be"),
        (["nope/run"], {}, "no such run directory or config file: nope/run"),
        ([DIGITS, "inspect.anomly=true"], {}, "did you mean 'inspect.anomaly'?"),
        ([DIGITS, "inspect.mode=test"], {}, "inspect.mode: Input should be 'train' or 'eval'"),
        (["seed=1"], {}, "give a RUN directory or a CONFIG.yaml first"),
    ],
)
def test_bad_input_gives_one_clear_line(
    args: list[str], options: dict, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: run_inspect(args, **options), debug=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


def test_a_runs_model_cannot_be_overridden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n")  # enough to be taken for a run
    with pytest.raises(SystemExit):
        run_cli(lambda: run_inspect([str(tmp_path), "model.kwargs.width=8"]), debug=False)
    assert "a run's model is fixed by its weights" in capsys.readouterr().err


def test_options_are_split_from_the_config_overrides() -> None:
    opts, rest = split_inspect_options(["c.yaml", "inspect.layer=stages.0", "optim.lr=1"])
    assert opts["layer"] == "stages.0" and opts["split"] == "test"
    assert rest == ["c.yaml", "optim.lr=1"]
    assert split_inspect_options(["inspect.anomaly=no"])[0]["anomaly"] is False

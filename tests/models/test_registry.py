"""Registry: built-ins by name, user classes by import path, and the error messages of both."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.data.base import DataInfo
from kiln.models import GPT, MLP, MultiHead, ResNet
from kiln.registry import MODELS, build_model, check_kwargs, data_kwargs, import_object

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
FLAT = DataInfo("classification", (12,), num_classes=3)
IMAGE = DataInfo("classification", (1, 8, 8), num_classes=4)


@pytest.fixture
def user_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """``usermodels`` importable, as a user's package would be on PYTHONPATH."""
    monkeypatch.syspath_prepend(str(HELPERS))


def test_builtins_by_name_for_every_task() -> None:
    mlp = build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), FLAT)
    reg = build_model(ModelConfig(name="mlp"), DataInfo("regression", (5,), num_outputs=2))
    resnet = build_model(ModelConfig(name="resnet", kwargs={"width": 4}), IMAGE)
    lm = DataInfo("lm", (6,), vocab_size=9)
    gpt = build_model(ModelConfig(name="gpt", kwargs={"n_embd": 16, "n_head": 2}), lm)
    assert isinstance(mlp, MLP) and mlp(torch.randn(2, 12)).shape == (2, 3)
    assert reg(torch.randn(2, 5)).shape == (2, 2)
    assert isinstance(resnet, ResNet) and resnet(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert isinstance(gpt, GPT) and gpt(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 6, 9)


def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(name="resnt"), IMAGE)
    assert str(err.value) == (
        "unknown model 'resnt'; did you mean 'resnet'? allowed: mlp, resnet, gpt, multihead, "
        "minilm, bow; "
        "or set model.target=pkg.module:Class"
    )
    with pytest.raises(
        ValueError,
        match=r"^unknown model 'zzz'; allowed: mlp, resnet, gpt, multihead, minilm, bow; or",
    ):
        build_model(ModelConfig(name="zzz"), IMAGE)


def test_bad_kwarg_suggests_and_lists() -> None:
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(name="resnet", kwargs={"widht": 8}), IMAGE)
    assert str(err.value) == (
        "model.kwargs.widht is not an argument of resnet; did you mean 'width'? "
        "allowed: depths, width, dropout, zero_init_residual, drop_path"
    )
    with pytest.raises(ValueError, match=r"^model\.kwargs\.qqq is not an argument of mlp; allowed"):
        build_model(ModelConfig(name="mlp", kwargs={"qqq": 1}), FLAT)
    with pytest.raises(ValueError, match=r"^model\.kwargs\.info is not an argument of mlp"):
        build_model(ModelConfig(name="mlp", kwargs={"info": None}), FLAT)


def test_wrong_type_is_wrapped_with_the_model_name() -> None:
    with pytest.raises(TypeError, match=r"building model 'mlp' with kwargs \{'hidden': 5\}"):
        build_model(ModelConfig(name="mlp", kwargs={"hidden": 5}), FLAT)


# Builders that mirror one class's constructor (minilm and bow load or size other parts).
MIRRORS = {"mlp": MLP, "resnet": ResNet, "gpt": GPT, "multihead": MultiHead}


def test_every_model_is_listed() -> None:
    assert set(MIRRORS) | {"minilm", "bow"} == set(MODELS)


@pytest.mark.parametrize("name", list(MIRRORS))
def test_builder_defaults_match_the_model_class(name: str) -> None:
    # Builders repeat the class defaults so their signatures can be checked; keep them in sync.
    builder = import_object(MODELS[name])
    cls = MIRRORS[name]
    class_params = inspect.signature(cls).parameters
    for pname, p in inspect.signature(builder).parameters.items():
        if pname != "info":
            assert class_params[pname].default == p.default, pname


def test_user_class_gets_only_the_data_args_it_names(user_code: None) -> None:
    net = build_model(ModelConfig(target="usermodels:TinyNet"), IMAGE)
    assert type(net).__name__ == "TinyNet"
    assert (net.in_features, net.num_classes, net.scale) == (64, 4, 1.0)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_user_kwargs_win_over_data_args(user_code: None) -> None:
    cfg = ModelConfig(target="usermodels:TinyNet", kwargs={"num_classes": 7, "scale": 2.0})
    net = build_model(cfg, IMAGE)
    assert (net.in_features, net.num_classes, net.scale) == (64, 7, 2.0)


def test_user_kwargs_are_checked_against_the_signature(user_code: None) -> None:
    cfg = ModelConfig(target="usermodels:TinyNet", kwargs={"scal": 2.0})
    with pytest.raises(
        ValueError,
        match=r"model.kwargs.scal is not an argument of "
        r"usermodels:TinyNet; did you mean 'scale'\?",
    ):
        build_model(cfg, IMAGE)


def test_var_kwargs_target_is_not_checked_and_gets_no_unnamed_data_args(user_code: None) -> None:
    net = build_model(ModelConfig(target="usermodels:KwargsNet", kwargs={"anything": 1}), IMAGE)
    assert net.out_features == 4  # named in the signature: injected
    assert net.extra == {"anything": 1}  # in_features, num_classes... not pushed into **extra


def test_factory_function_target(user_code: None) -> None:
    net = build_model(ModelConfig(target="usermodels:make_net", kwargs={"width": 3}), FLAT)
    assert net(torch.randn(2, 12)).shape == (2, 1)


def test_target_that_is_not_a_module_is_refused(user_code: None) -> None:
    with pytest.raises(TypeError, match=r"returned 'int', not a torch\.nn\.Module"):
        build_model(ModelConfig(target="usermodels:not_a_module"), FLAT)
    with pytest.raises(TypeError, match="not a class or function"):
        build_model(ModelConfig(target="usermodels:NOT_CALLABLE"), FLAT)


def test_missing_module_says_how_to_make_it_importable() -> None:
    with pytest.raises(ImportError, match=r"cannot import module 'no_such_pkg.nets'.*PYTHONPATH"):
        import_object("no_such_pkg.nets:Net")


def test_missing_dependency_of_the_module_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kiln_test_needs_dep.py").write_text("import kiln_test_absent_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"it needs 'kiln_test_absent_dep'"):
        import_object("kiln_test_needs_dep:Net")


def test_missing_attribute_suggests_similar_names(user_code: None) -> None:
    with pytest.raises(ImportError, match=r"has no attribute 'TinyNett'.*did you mean 'TinyNet'\?"):
        import_object("usermodels:TinyNett")
    with pytest.raises(ValueError, match=r"must look like 'package\.module:Name'"):
        import_object("usermodels.TinyNet")


def test_data_kwargs_per_task() -> None:
    assert data_kwargs(IMAGE) == {
        "in_features": 64,
        "input_shape": (1, 8, 8),
        "in_channels": 1,
        "num_classes": 4,
        "out_features": 4,
    }
    assert data_kwargs(DataInfo("regression", (5,), num_outputs=2))["out_features"] == 2
    lm = data_kwargs(DataInfo("lm", (6,), vocab_size=9))
    assert (lm["vocab_size"], lm["block_size"], lm["out_features"]) == (9, 6, 9)


def test_check_kwargs_skips_var_kwargs() -> None:
    def takes_any(**kwargs: object) -> nn.Module:
        return nn.Identity()

    check_kwargs(takes_any, {"whatever": 1}, "takes_any")  # no error


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, kiln.registry; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False", out.stderr

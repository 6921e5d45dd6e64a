"""Named intermediate outputs: forward hooks and the FX-rewritten graph agree exactly."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import kiln.models.features as features_module
from kiln.inspect.hooks import hook_count
from kiln.models import MLP, ResNet
from kiln.models.features import create_feature_extractor, feature_names, get_features


class DataDependent(nn.Module):
    """A user's model FX cannot trace: its control flow depends on tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class WithSpare(nn.Module):
    """A module registered but never called by the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 2)
        self.spare = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(num_classes=5, in_channels=1, depths=(1, 1), width=4).eval()


def test_docstring_examples() -> None:
    result = doctest.testmod(
        features_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("make", "shape", "names"),
    [
        (_resnet, (2, 1, 8, 8), ["stem", "stages.0", "stages.1.0.branch.conv1", "pool", "fc"]),
        (_resnet, (2, 1, 8, 8), ["stages", "stages.1", "stages.1.0", "stages.1.0.act"]),
        (lambda: MLP(6, 3, hidden=(8, 5), norm="layer"), (4, 6), ["hidden.1", "hidden", "fc"]),
    ],
)
def test_hooks_and_fx_give_identical_tensors(make, shape, names) -> None:
    model = make().eval()
    x = torch.randn(*shape)
    hooked = get_features(model, x, names)
    extractor = create_feature_extractor(model, names)
    traced = extractor(x)
    assert list(hooked) == list(traced) == names
    for n in names:
        assert torch.equal(hooked[n], traced[n]), n
    assert hook_count(model) == 0
    assert not extractor.training


def test_fx_drops_later_layers_and_renames_outputs() -> None:
    net = _resnet()
    extractor = create_feature_extractor(net, {"stages.0": "early"})
    assert "stages_1" not in extractor.code and "fc" not in extractor.code
    assert not hasattr(extractor, "fc")
    out = extractor(torch.randn(2, 1, 8, 8))
    assert list(out) == ["early"] and out["early"].shape == (2, 4, 8, 8)
    # the extractor shares the model's weights
    assert extractor.get_submodule("stem.0").weight is net.stem[0].weight


def test_fx_reaches_functional_nodes() -> None:
    net = _resnet()
    names = feature_names(net)
    assert "add" in names and "stages.0.0.branch.conv1" in names
    x = torch.randn(2, 1, 8, 8)
    out = create_feature_extractor(net, ["add"])(x)["add"]
    # the first residual sum is the input of the first block's final ReLU
    pre_relu = get_features(net, x, ["stages.0.0.act"])["stages.0.0.act"]
    assert torch.equal(out.relu(), pre_relu)


def test_untraceable_model_points_to_hooks() -> None:
    model = DataDependent()
    with pytest.raises(RuntimeError, match=r"cannot trace DataDependent.*get_features"):
        create_feature_extractor(model, ["a"])
    out = get_features(model, torch.randn(3, 4), ["a", "b"])
    assert out["a"].shape == (3, 4) and out["b"].shape == (3, 2)


def test_unknown_names_list_candidates() -> None:
    net = _resnet()
    with pytest.raises(ValueError, match=r"did you mean 'stages\.0\.0'.*'stem'"):
        get_features(net, torch.randn(1, 1, 8, 8), ["stages.00"])
    with pytest.raises(ValueError, match=r"no feature 'poool'; did you mean 'pool'"):
        create_feature_extractor(net, ["poool"])
    with pytest.raises(ValueError, match=r"module 'spare' is not called"):
        create_feature_extractor(WithSpare(), ["spare"])
    with pytest.raises(ValueError, match=r"did not run"):
        get_features(WithSpare(), torch.randn(1, 2), ["used", "spare"])

"""ModuleTracer: the one FX tracer behind feature extraction, fusion and structured pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.compress.fuse import trace
from kiln.compress.prune.structured import find_groups
from kiln.models.features import create_feature_extractor, feature_names
from kiln.models.layers import DropPath
from kiln.models.tracing import ModuleTracer


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.drop = DropPath(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.branch(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Residual()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def _module_calls(graph: torch.fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_module"]


def test_droppath_and_named_classes_stay_single_nodes_and_outputs_are_recorded() -> None:
    net = Net().train()  # training mode: DropPath's body would draw random numbers
    tracer = ModuleTracer()
    graph = tracer.trace(net)
    assert _module_calls(graph) == ["block.branch.0", "block.branch.1", "block.branch.2",
                                    "block.drop", "head"]  # fmt: skip
    assert {"block", "block.branch", "block.drop", "head"} <= set(tracer.module_outputs)
    opaque = ModuleTracer([Residual]).trace(net)
    assert _module_calls(opaque) == ["block", "head"]


def test_features_fusion_and_pruning_see_the_same_graph() -> None:
    """The three passes trace with one tracer: DropPath is one node for all of them."""
    net = Net().train()
    names = feature_names(net)
    assert "block.drop" in names
    assert not any("rand" in n or "bernoulli" in n for n in names), names
    extractor = create_feature_extractor(net.eval(), ["block.drop"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(extractor(x)["block.drop"], net.block.branch(x))
    assert _module_calls(trace(net).graph) == _module_calls(ModuleTracer().trace(net))
    assert find_groups(net)  # structured pruning reads the same dataflow


@pytest.mark.parametrize("leaf", [Residual, nn.Sequential])
def test_leaf_modules_are_honoured(leaf: type[nn.Module]) -> None:
    calls = _module_calls(ModuleTracer([leaf]).trace(Net()))
    assert ("block" in calls) == (leaf is Residual)
    assert ("block.branch" in calls) == (leaf is nn.Sequential)

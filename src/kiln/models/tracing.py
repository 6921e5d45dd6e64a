"""The one ``torch.fx`` tracer Kiln uses: feature extraction, fusion and structured pruning.

Every pass that reads a model's dataflow must see the same graph, so they share one tracer:
``torch.nn`` layers stay single nodes (FX's default), and so do Kiln's
:class:`~kiln.models.layers.DropPath` (its body draws random numbers in training mode, which
FX would unroll into the graph) and any classes a caller names. It also records the output node
of every module call, leaf or not, so a module's output can be asked for by its name.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> tracer = ModuleTracer()
    >>> graph = tracer.trace(net)
    >>> [n.op for n in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    >>> sorted(tracer.module_outputs)
    ['0', '1']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from kiln.models.layers import DropPath

__all__ = ["ModuleTracer"]


class ModuleTracer(fx.Tracer):
    """``fx.Tracer`` that keeps ``torch.nn`` layers, DropPath and ``leaf_modules`` opaque.

    Args:
        leaf_modules: more module classes to keep as single nodes (e.g. a custom block whose
            forward FX cannot follow).

    Attributes:
        module_outputs: dotted module name -> the output node of its last call (modules that
            return a tuple or other non-proxy value are left out).

    Example:
        >>> from kiln.models.layers import DropPath
        >>> net = nn.Sequential(nn.Linear(2, 2), DropPath(0.1))
        >>> [n.op for n in ModuleTracer().trace(net).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.leaves: tuple[type[nn.Module], ...] = (DropPath, *leaf_modules)
        self.module_outputs: dict[str, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):  # a module returning a tuple is reachable via its nodes
            # a module called several times keeps its last call, as with hooks
            self.module_outputs[self.path_of_module(m)] = out.node
        return out

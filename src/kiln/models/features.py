"""Intermediate outputs of a model by name: with forward hooks, or as a rewritten FX graph.

Transfer learning and inspection both need what a model computes *inside* (the pooled features
before the head, a block's feature map). Two ways, giving identical tensors:

* :func:`get_features` runs the model once with forward hooks on the named modules
  (:func:`kiln.inspect.hooks.capture_activations`) and returns their outputs. It works on every
  model, whatever its forward does, and reaches module outputs only.
* :func:`create_feature_extractor` traces the model with ``torch.fx`` and rewrites the graph to
  return a dict of the requested module outputs or graph nodes (a functional ``add`` or
  ``flatten`` too). Layers after the last requested output are dropped from the graph, so they
  cost nothing, and the result is an ``nn.Module`` that can be exported or compiled. It needs a
  traceable forward: control flow on tensor values (``if x.sum() > 0``) cannot be traced.

Names are those of ``model.named_modules()`` (``stages.0``), or FX node names listed by
:func:`feature_names` (``add_1``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> hooked = get_features(net, x, ["1"])
    >>> traced = create_feature_extractor(net, ["1"])(x)
    >>> torch.equal(hooked["1"], traced["1"])
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from kiln.config import did_you_mean
from kiln.models.tracing import ModuleTracer

__all__ = ["create_feature_extractor", "feature_names", "get_features"]


def _unknown(model: nn.Module, name: str, candidates: list[str], what: str) -> ValueError:
    did = did_you_mean(name, candidates)
    shown = ", ".join(repr(c) for c in candidates[:16])
    more = ", ..." if len(candidates) > 16 else ""
    return ValueError(f"{type(model).__name__} has no {what} {name!r}; {did}{what}s: {shown}{more}")


def get_features(
    model: nn.Module,
    x: torch.Tensor | tuple[Any, ...],
    names: Sequence[str],
    *,
    detach: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``model`` once and return the outputs of the named modules (forward hooks).

    The hooks are removed when the call returns, also when the forward raises. A module that
    runs several times gives its last output; a module returning a tuple or dict gives its
    first tensor. The model runs in its current mode and grad mode: call ``model.eval()`` and
    wrap the call in ``torch.inference_mode()`` for plain feature extraction.

    Args:
        model: any model.
        x: the input, or a tuple of the forward's positional arguments.
        names: module names as in ``model.named_modules()``.
        detach: return tensors cut from the autograd graph.

    Returns:
        ``{name: output}`` in the order of ``names``.

    Raises:
        ValueError: a name is not a module of ``model`` (the message lists the modules), or
            a named module did not run in the forward.

    Example:
        >>> import torch
        >>> from kiln.models import ResNet
        >>> net = ResNet(num_classes=3, in_channels=1, depths=(1, 1), width=4).eval()
        >>> feats = get_features(net, torch.randn(2, 1, 8, 8), ["stages.1", "pool"])
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'stages.1': (2, 8, 4, 4), 'pool': (2, 8)}
    """
    from kiln.inspect.hooks import capture_activations

    wanted = list(dict.fromkeys(names))
    modules = [n for n, _ in model.named_modules() if n]
    for name in wanted:
        if name not in modules:
            raise _unknown(model, name, modules, "module")
    args = x if isinstance(x, tuple) else (x,)
    with capture_activations(model, wanted, detach=detach) as store:
        model(*args)
    silent = [n for n in wanted if n not in store]
    if silent:
        raise ValueError(
            f"modules {', '.join(map(repr, silent))} did not run (or returned no tensor) in "
            f"{type(model).__name__}'s forward; pick modules the forward calls"
        )
    return {n: store[n] for n in wanted}


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """The graph and requestable name -> node (module outputs first, then every node)."""
    tracer = ModuleTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        # Tracing runs the user's forward on proxies; anything it cannot follow (control flow
        # on tensor values, len() of a tensor, calls into C extensions) surfaces here.
        raise RuntimeError(
            f"torch.fx cannot trace {type(model).__name__}'s forward ({type(err).__name__}: "
            f"{err}); use kiln.models.features.get_features(model, x, names), which captures "
            "module outputs with forward hooks and works on any forward"
        ) from err
    by_name = dict(tracer.module_outputs)
    for node in graph.nodes:
        if node.op != "output":
            by_name.setdefault(node.name, node)
    return graph, by_name


def feature_names(model: nn.Module) -> list[str]:
    """The names :func:`create_feature_extractor` accepts for ``model``, in graph order.

    Each called leaf module appears under its module name (``stages.0.0.branch.conv1``); every
    other graph node (functions such as ``add`` and ``flatten``, methods, the input) under its
    FX node name. Any module of ``model.named_modules()`` that the forward calls is accepted too.

    Raises:
        RuntimeError: FX cannot trace the model (use :func:`get_features`).

    Example:
        >>> from torch import nn
        >>> feature_names(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        ['input_1', '0', '1']
    """
    graph, _ = _trace(model)
    return [str(n.target) if n.op == "call_module" else n.name for n in graph.nodes][:-1]


def create_feature_extractor(
    model: nn.Module, names: Sequence[str] | Mapping[str, str]
) -> fx.GraphModule:
    """A module that returns ``{key: tensor}`` for the named modules or nodes of ``model``.

    ``model`` is traced with ``torch.fx`` (``symbolic_trace``: ``torch.nn`` layers stay single
    nodes, other modules are traced through) while the tracer notes the node each module call
    returns, so containers and a user's blocks can be requested by module name too. The
    graph's output is replaced by a dict of the requested nodes and the nodes nothing needs
    any more are removed. The result shares its parameters and buffers with ``model`` and
    starts in ``model``'s train/eval mode. A module called several times gives its last
    call's output; a module returning a tuple is reached through the nodes inside it.

    Args:
        model: a model whose forward FX can trace.
        names: module names (``"stages.1"``) or node names from :func:`feature_names`; or a
            mapping of those to the output keys (``{"pool": "features"}``).

    Returns:
        An ``fx.GraphModule``; ``print(extractor.code)`` shows the rewritten forward.

    Raises:
        RuntimeError: FX cannot trace the forward (the message points to :func:`get_features`).
        ValueError: an unknown name (the message lists the candidates).

    Example:
        >>> import torch
        >>> from kiln.models import ResNet
        >>> net = ResNet(num_classes=3, in_channels=1, depths=(1, 1), width=4).eval()
        >>> extractor = create_feature_extractor(net, {"stages.0": "early", "pool": "late"})
        >>> out = extractor(torch.randn(2, 1, 8, 8))
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'early': (2, 4, 8, 8), 'late': (2, 8)}
        >>> "fc" in extractor.code
        False
    """
    keys = dict(names) if isinstance(names, Mapping) else {n: n for n in names}
    if not keys:
        raise ValueError("names is empty; give the modules or nodes to return")
    graph, nodes = _trace(model)
    for name in keys:
        if name not in nodes:
            modules = [n for n, _ in model.named_modules() if n]
            if name in modules:
                raise ValueError(
                    f"module {name!r} is not called by {type(model).__name__}'s traced forward, "
                    "or returns a tuple (request the nodes inside it, or use get_features)"
                )
            candidates = list(dict.fromkeys([*feature_names(model), *modules]))
            raise _unknown(model, name, candidates, "feature")
    output = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(output)
    graph.output({key: nodes[name] for name, key in keys.items()})
    extractor = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Features")
    extractor.graph.eliminate_dead_code()
    extractor.graph.lint()
    extractor.delete_all_unused_submodules()
    extractor.recompile()
    extractor.training = model.training  # submodules keep their own modes (a frozen BN's eval)
    return extractor

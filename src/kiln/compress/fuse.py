"""Operator fusion for inference: fold BatchNorm into the layer before it, merge linear chains.

Why: in evaluation mode a BatchNorm is a fixed per-channel affine map, so it can be folded into
the convolution (or linear layer) that feeds it, removing a whole pass over the activations;
two Linear layers with nothing between them are one linear map (``W = W2 @ W1``,
``b = W2 @ b1 + b2``). The outputs stay the same up to float rounding.

:func:`fuse` is an FX pass that works on any model ``torch.fx.symbolic_trace`` can trace:

* ``conv-bn``: Conv1d/2d/3d followed by its BatchNorm -> one Conv with the BN folded in.
* ``conv-bn-relu`` / ``conv-relu``: the same, then the ReLU joins it as one
  ``torch.ao.nn.intrinsic.ConvReLU{1,2,3}d`` module (what static quantization maps to one
  quantized kernel).
* ``linear-bn``: Linear followed by BatchNorm1d -> one Linear.
* ``linear-linear``: consecutive Linear layers -> one Linear, only when that does not add work
  (a narrow bottleneck ``a -> k -> b`` with ``k * (a + b) < a * b`` is kept).
* Dropout, DropPath and Identity modules are removed (identities in evaluation mode).

A model FX cannot trace (Python control flow on tensor values) gets an
:class:`UntraceableError` that says what to change; :func:`fuse_sequential` folds Conv/Linear +
BatchNorm (+ ReLU) inside ``nn.Sequential`` containers without tracing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(144, 32), nn.Linear(32, 10)).eval()
    >>> fused, report = fuse(net)
    >>> [f.kind for f in report.fusions]
    ['conv-bn-relu', 'linear-linear']
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = [
    "FuseReport",
    "Fusion",
    "UntraceableError",
    "fold_linear",
    "fuse",
    "fuse_sequential",
    "sequential_groups",
    "trace",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCTIONS = (torch.relu, F.relu, torch.relu_)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


HOW_TO_TRACE = (
    "make its forward traceable: no Python if/for/while on tensor values (use torch.where "
    "or masks), no .item()/.tolist()/numpy on tensors; or move the untraceable part into its "
    "own submodule and pass its class in leaf_modules=[...] so it stays opaque"
)


class UntraceableError(ValueError):
    """``torch.fx`` could not trace the model; the message says what to change.

    Attributes:
        model_name: the model's class name.
        reason: the tracer's error, one line.
    """

    def __init__(self, message: str, *, model_name: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.model_name, self.reason = model_name, reason


@dataclass(frozen=True)
class Fusion:
    """One fused pattern.

    Attributes:
        kind: ``conv-bn``, ``conv-bn-relu``, ``conv-relu``, ``linear-bn`` or ``linear-linear``.
        names: the original modules (qualified names, or ``relu`` for a functional ReLU).
        into: the module of the fused model that now does their work.
    """

    kind: str
    names: tuple[str, ...]
    into: str

    def __str__(self) -> str:
        return f"{self.kind}: {' + '.join(self.names)} -> {self.into}"


@dataclass
class FuseReport:
    """What :func:`fuse` or :func:`fuse_sequential` did.

    Attributes:
        fusions: the fused patterns, in graph order.
        removed: Dropout/DropPath/Identity modules dropped (identities in evaluation mode).
        kept: patterns seen but left alone, each with the reason.
    """

    fusions: list[Fusion] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Fusions per kind, e.g. ``{"conv-bn-relu": 3, "linear-linear": 1}``."""
        return dict(Counter(f.kind for f in self.fusions))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for ``report.json``)."""
        return {
            "counts": self.counts(),
            "fusions": [str(f) for f in self.fusions],
            "removed": list(self.removed),
            "kept": list(self.kept),
        }

    def __str__(self) -> str:
        if not self.fusions:
            return "nothing fused"
        return ", ".join(f"{kind} x{n}" for kind, n in self.counts().items())


# --------------------------------------------------------------------------- math


def fold_linear(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """One Linear equal to ``second(first(x))``: ``W = W2 W1``, ``b = W2 b1 + b2``.

    Example:
        >>> a, b = nn.Linear(4, 3), nn.Linear(3, 2)
        >>> x = torch.randn(5, 4)
        >>> torch.testing.assert_close(fold_linear(a, b)(x), b(a(x)))
    """
    if second.in_features != first.out_features:
        raise ValueError(
            f"cannot fold Linear({first.in_features}, {first.out_features}) into "
            f"Linear({second.in_features}, {second.out_features}): sizes do not chain"
        )
    w1, w2 = first.weight.detach(), second.weight.detach()
    has_bias = first.bias is not None or second.bias is not None
    fused = nn.Linear(first.in_features, second.out_features, bias=has_bias)
    fused = fused.to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        # float64 products: the folded layer then matches the two-layer result to ~1e-7.
        fused.weight.copy_((w2.double() @ w1.double()).to(w1.dtype))
        if fused.bias is not None:
            bias = torch.zeros(second.out_features, dtype=torch.float64, device=w1.device)
            if first.bias is not None:
                bias += w2.double() @ first.bias.detach().double()
            if second.bias is not None:
                bias += second.bias.detach().double()
            fused.bias.copy_(bias.to(w1.dtype))
    return fused


def _conv_relu(conv: nn.Module, relu: nn.Module | None = None) -> nn.Module:
    import torch.ao.nn.intrinsic as nni

    kinds: dict[type[nn.Module], type[nn.Module]] = {
        nn.Conv1d: nni.ConvReLU1d,
        nn.Conv2d: nni.ConvReLU2d,
        nn.Conv3d: nni.ConvReLU3d,
    }
    return kinds[type(conv)](conv, relu if relu is not None else nn.ReLU())


def _bn_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None when it can)."""
    if not isinstance(bn, _BNS) or bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics (track_running_stats=False)"
    channels = layer.out_channels if isinstance(layer, _CONVS) else layer.out_features
    if bn.num_features != channels:
        return f"BatchNorm of {bn.num_features} features after {channels} channels"
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return "only BatchNorm1d folds into a Linear"
    return None


def _fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    assert isinstance(bn, _BNS)  # checked by _bn_problem
    if isinstance(layer, _CONVS):
        return fuse_conv_bn_eval(layer, bn)
    assert isinstance(layer, nn.Linear)
    return fuse_linear_bn_eval(layer, bn)


# --------------------------------------------------------------------------- tracing


def trace(model: nn.Module, *, leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """``torch.fx`` trace of ``model``, keeping ``leaf_modules`` (and Kiln's DropPath) opaque.

    Raises:
        UntraceableError: FX cannot trace the model; the message says what to change.

    Example:
        >>> gm = trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    from kiln.models.tracing import ModuleTracer

    try:
        graph = ModuleTracer(leaf_modules).trace(model)
    except Exception as exc:  # FX raises TraceError, TypeError, RuntimeError... by case
        name = type(model).__name__
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise UntraceableError(
            f"torch.fx cannot trace {name} ({reason}). To fuse it, {HOW_TO_TRACE}. Without "
            "tracing, kiln.compress.fuse.fuse_sequential(model) still folds Conv/Linear + "
            "BatchNorm (+ ReLU) inside nn.Sequential containers",
            model_name=name,
            reason=reason,
        ) from exc
    return fx.GraphModule(model, graph, type(model).__name__)


# --------------------------------------------------------------------------- the FX pass


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _only_input(node: fx.Node) -> fx.Node | None:
    """The node's single tensor input, when it has exactly one argument and no kwargs."""
    plain = not node.kwargs or (node.op == "call_function" and set(node.kwargs) <= {"inplace"})
    if plain and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _single_user_producer(node: fx.Node) -> fx.Node | None:
    """The node feeding ``node`` when ``node`` is its only user and, for a module call, the
    module's only call (a module applied twice cannot be rewritten for one of its calls)."""
    src = _only_input(node)
    if src is None or len(src.users) != 1 or not _called_once(src):
        return None
    return src


def _called_once(node: fx.Node) -> bool:
    """Whether ``node``'s module (if it calls one) is called by no other node."""
    if node.op != "call_module":
        return True
    return sum(n.op == "call_module" and n.target == node.target for n in node.graph.nodes) == 1


def _remove_identities(gm: fx.GraphModule, report: FuseReport) -> None:
    from kiln.models.layers import DropPath

    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        src = _only_input(node)
        # All are identities in evaluation mode (fuse works on an eval-mode copy).
        if isinstance(mod, (*_IDENTITIES, DropPath)) and src is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            report.removed.append(str(node.target))


def _fold_batchnorms(gm: fx.GraphModule, report: FuseReport, origin: dict[str, tuple]) -> None:
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, _BNS):
            continue
        src = _single_user_producer(node)
        layer = _module(gm, src) if src is not None else None
        if src is None or not isinstance(layer, (*_CONVS, nn.Linear)):
            continue
        problem = _bn_problem(layer, bn)
        if problem is not None:
            report.kept.append(f"{src.target} + {node.target}: {problem}")
            continue
        _set_module(gm, str(src.target), _fold_bn(layer, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        kind = "conv-bn" if isinstance(layer, _CONVS) else "linear-bn"
        origin[str(src.target)] = (kind, (str(src.target), str(node.target)))


def _fold_relus(gm: fx.GraphModule, report: FuseReport, origin: dict[str, tuple]) -> None:
    for node in list(gm.graph.nodes):
        if not _is_relu(gm, node):
            continue
        src = _single_user_producer(node)
        conv = _module(gm, src) if src is not None else None
        if src is None or type(conv) not in _CONVS:
            continue
        assert conv is not None  # for the type checker
        relu_mod = _module(gm, node)
        _set_module(gm, str(src.target), _conv_relu(conv, relu_mod))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        name = str(node.target) if node.op == "call_module" else "relu"
        kind, names = origin.get(str(src.target), ("conv", (str(src.target),)))
        origin[str(src.target)] = (f"{kind}-relu", (*names, name))


def _fold_linear_chains(gm: fx.GraphModule, report: FuseReport, origin: dict[str, tuple]) -> None:
    changed = True
    while changed:  # a chain a -> b -> c folds pairwise until nothing is left to fold
        changed = False
        for node in list(gm.graph.nodes):
            second = _module(gm, node)
            linear = type(second) is nn.Linear and _called_once(node)  # it gets replaced
            src = _single_user_producer(node) if linear else None
            first = _module(gm, src) if src is not None else None
            if src is None or type(first) is not nn.Linear:
                continue
            assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
            a, k, b = first.in_features, first.out_features, second.out_features
            if a * b > k * (a + b):
                report.kept.append(
                    f"{src.target} + {node.target}: a {a}->{k}->{b} bottleneck is cheaper "
                    f"than one {a}x{b} layer"
                )
                continue
            _set_module(gm, str(node.target), fold_linear(first, second))
            node.args = src.args
            gm.graph.erase_node(src)
            names_a = origin.pop(str(src.target), ("linear", (str(src.target),)))[1]
            names_b = origin.get(str(node.target), ("linear", (str(node.target),)))[1]
            origin[str(node.target)] = ("linear-linear", (*names_a, *names_b))
            changed = True
            break


def fuse(
    model: nn.Module,
    *,
    linear_chains: bool = True,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> tuple[fx.GraphModule, FuseReport]:
    """Fold BatchNorm (+ ReLU) into convs and merge linear chains, as an FX pass on a copy.

    The model is copied and put in evaluation mode first (BatchNorm folding uses its running
    statistics); ``model`` itself is not changed.

    Args:
        model: any module ``torch.fx`` can trace.
        linear_chains: also merge consecutive Linear layers.
        leaf_modules: module classes to keep opaque (not traced into, not fused).

    Returns:
        The fused ``GraphModule`` (evaluation mode) and a :class:`FuseReport`.

    Raises:
        UntraceableError: FX cannot trace the model (the message says what to change).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2))
        >>> fused, report = fuse(net)
        >>> str(report), report.removed
        ('linear-linear x1', ['1'])
    """
    gm = trace(copy.deepcopy(model).eval(), leaf_modules=leaf_modules).eval()
    report = FuseReport()
    origin: dict[str, tuple] = {}  # fused module name -> (kind, original names)
    _remove_identities(gm, report)
    _fold_batchnorms(gm, report, origin)
    _fold_relus(gm, report, origin)
    if linear_chains:
        _fold_linear_chains(gm, report, origin)
    order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    for into, (kind, names) in sorted(origin.items(), key=lambda kv: order.get(kv[0], 0)):
        if kind not in ("conv", "linear"):
            report.fusions.append(Fusion(kind, tuple(names), into))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report


# --------------------------------------------------------------------------- without tracing


def _sequential_groups(seq: nn.Sequential) -> list[list[str]]:
    """Runs of child names ``[layer, bn]``, ``[conv, bn, relu]``, ``[conv, relu]`` in ``seq``."""
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]
    groups, i = [], 0
    while i < len(mods):
        mod, group = mods[i], [names[i]]
        if isinstance(mod, (*_CONVS, nn.Linear)):
            j = i + 1
            if j < len(mods) and isinstance(mods[j], _BNS) and not _bn_problem(mod, mods[j]):
                group.append(names[j])
                j += 1
            if j < len(mods) and type(mods[j]) is nn.ReLU and type(mod) in _CONVS:
                group.append(names[j])
                j += 1
            if len(group) > 1:
                groups.append(group)
                i = j
                continue
        i += 1
    return groups


def sequential_groups(model: nn.Module) -> list[list[str]]:
    """Qualified names of every foldable run inside the ``nn.Sequential`` s of ``model``.

    Example:
        >>> sequential_groups(nn.Sequential(nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2), nn.ReLU()))
        [['0', '1', '2']]
    """
    found = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            dot = f"{prefix}." if prefix else ""
            found += [[dot + n for n in group] for group in _sequential_groups(mod)]
    return found


def fuse_sequential(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """Fold Conv/Linear + BatchNorm (+ ReLU) runs inside ``nn.Sequential`` s, without tracing.

    For models FX cannot trace. Folded BatchNorm and ReLU children become ``nn.Identity`` so
    the Sequential's indices stay valid. Works on an evaluation-mode copy.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
        >>> fused, report = fuse_sequential(net)
        >>> str(report)
        'conv-bn-relu x1'
    """
    model = copy.deepcopy(model).eval()
    report = FuseReport()
    for group in sequential_groups(model):
        layer = model.get_submodule(group[0])
        mods = [model.get_submodule(n) for n in group]
        has_bn = len(mods) > 1 and isinstance(mods[1], _BNS)
        fused = _fold_bn(layer, mods[1]) if has_bn else layer
        if isinstance(mods[-1], nn.ReLU):
            fused = _conv_relu(fused, mods[-1])
        _set_module(model, group[0], fused)
        for name in group[1:]:
            _set_module(model, name, nn.Identity())
        base = "conv" if isinstance(layer, _CONVS) else "linear"
        kind = base + ("-bn" if has_bn else "") + ("-relu" if isinstance(mods[-1], nn.ReLU) else "")
        report.fusions.append(Fusion(kind, tuple(group), group[0]))
    return model, report

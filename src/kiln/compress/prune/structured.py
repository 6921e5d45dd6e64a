"""Structured pruning: remove whole neurons and channels, so layers really get smaller.

Unstructured pruning zeroes single weights and leaves every tensor its size; this module removes
output units of a layer (rows of a ``Linear``, filters of a ``Conv``) together with everything
that reads them, so the pruned model has fewer parameters, a smaller file and faster matmuls on
any hardware.

Which layers can shrink is read from the model's dataflow (``torch.fx``), not from its class:
a *group* is a producer ``Linear``/``Conv`` whose output flows, through per-channel modules only
(BatchNorm, a LayerNorm over the features, activations, dropout, DropPath, Identity), into exactly
one consumer ``Linear``/``Conv``. Removing channel ``c`` then means: row/filter ``c`` of the
producer (and its bias), entry ``c`` of every norm on the way (weight, bias, running mean and
variance) and input column/channel ``c`` of the consumer. An output that goes anywhere else (a
residual ``add``, a concatenation, a flatten, the model's output) is never pruned, because
its width is tied to another tensor. For Kiln's models this means:

* MLP: every hidden layer (``hidden.0``, ``hidden.3``, ...) loses neurons; the input and the
  classifier's outputs keep their size.
* ResNet: inside each :class:`~kiln.models.resnet.BasicBlock` the ``conv1 -> bn1 -> act1 ->
  conv2`` channels shrink; the block outputs (tied to the shortcut by the residual add), the stem
  and the shortcut projections keep their width, so every residual sum still lines up.

Importance of a channel is the L1 (or L2) norm of its producer weights, or random for a baseline.
Each group loses ``round(amount * width)`` channels (at least one is always kept). Layers are
shrunk in place: the model keeps its class, its module names and its ``state_dict`` keys; only
the shapes (and ``in_features``/``out_channels``/``num_features`` ...) change. :func:`widths`
records the new sizes and :func:`resize_` applies them to a freshly built model, which is how a
pruned model is loaded back from safetensors.

Example:
    >>> import torch
    >>> from kiln.models.mlp import MLP
    >>> net = MLP(64, 10, hidden=(32, 32))
    >>> result = prune_structured(net, 0.5)
    >>> net.hidden[0].out_features, net.hidden[2].in_features, net.fc.in_features
    (16, 16, 16)
    >>> net(torch.randn(2, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from kiln.models.tracing import ModuleTracer

__all__ = [
    "NORMS",
    "Group",
    "StructuredResult",
    "channel_importance",
    "find_groups",
    "param_count",
    "prune_structured",
    "resize_",
    "slice_state",
    "widths",
]

NORMS = ("l1", "l2", "random")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, *_CONVS)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel alone: removing a channel before them removes it after them.
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.dropout,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}


@dataclass
class Group:
    """One prunable set of channels: ``producer`` -> per-channel ``norms`` -> ``consumer``.

    Attributes:
        producer: name of the ``Linear``/``Conv`` whose output units are removed.
        norms: names of the BatchNorm/LayerNorm modules on the way, sliced the same way.
        consumer: name of the ``Linear``/``Conv`` whose input columns/channels are removed.
    """

    producer: str
    norms: list[str]
    consumer: str


@dataclass
class StructuredResult:
    """What :func:`prune_structured` did.

    Attributes:
        groups: the groups that were pruned.
        kept: per producer, the indices of the channels kept (relative to its width before).
        before: per producer, its width before.
        after: per producer, its width after.
    """

    groups: list[Group]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)


def _out_width(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)  # type: ignore[arg-type]


def _in_width(m: nn.Module) -> int:
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)  # type: ignore[arg-type]


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _LAYERS) and (isinstance(m, nn.Linear) or m.groups == 1)


def _passes_channels(node: fx.Node, modules: Mapping[str, nn.Module], src: fx.Node) -> bool:
    """Whether ``node`` maps each channel of ``src`` to the same channel, on its own."""
    if node.op == "call_module":
        from kiln.models.layers import DropPath

        return isinstance(modules[str(node.target)], (*_ELEMENTWISE, DropPath))
    first = node.args[0] if node.args else None
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS and first is src
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS and first is src
    return False


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return ModuleTracer().trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError)
        raise ValueError(
            f"structured pruning reads the model's dataflow with torch.fx, which cannot trace "
            f"{type(model).__name__}: {type(exc).__name__}: {exc}. Use unstructured pruning "
            "(drop --structured), or make forward() free of data-dependent Python control flow"
        ) from exc


def find_groups(model: nn.Module) -> list[Group]:
    """The prunable groups of ``model``, in forward order (see the module docstring).

    A module called more than once, a grouped/depthwise conv, or a weight shared with another
    module is never part of a group.

    Raises:
        ValueError: ``model`` cannot be traced with ``torch.fx``.

    Example:
        >>> from kiln.models.mlp import MLP
        >>> [g.producer for g in find_groups(MLP(8, 2, hidden=(4, 4)))]
        ['hidden.0', 'hidden.2']
    """
    graph = _trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1

    def plain(name: str) -> bool:
        m = modules[name]
        own = list(m.parameters(recurse=False))
        return calls[name] == 1 and all(seen[id(p)] == 1 for p in own)

    groups: list[Group] = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_layer(modules[str(node.target)]):
            continue
        name = str(node.target)
        if not plain(name):
            continue
        width = _out_width(modules[name])
        norms: list[str] = []
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            target = str(nxt.target)
            m = modules.get(target) if nxt.op == "call_module" else None
            if m is not None and _is_layer(m):
                if plain(target) and _in_width(m) == width and nxt.args[0] is cur:
                    groups.append(Group(name, norms, target))
                break
            batchnorm = isinstance(m, _BATCHNORMS) and m.num_features == width
            # A LayerNorm over the features of a Linear: sliced like a BatchNorm (its statistics
            # are then taken over the kept features only).
            layernorm = (
                isinstance(m, nn.LayerNorm)
                and isinstance(modules[name], nn.Linear)
                and tuple(m.normalized_shape) == (width,)
            )
            if (batchnorm or layernorm) and plain(target):
                norms.append(target)
            elif not _passes_channels(nxt, modules, cur):
                break
            cur = nxt
    return groups


def channel_importance(layer: nn.Module, norm: str = "l1") -> torch.Tensor:
    """The L1 or L2 norm of each output unit's weights: rows of a Linear, filters of a Conv.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 0.5]]))
        >>> channel_importance(lin).tolist()
        [3.0, 1.5]
    """
    w = layer.weight.detach().flatten(1)  # type: ignore[operator]
    if norm == "l1":
        return w.abs().sum(1)
    if norm == "l2":
        return w.pow(2).sum(1).sqrt()
    raise ValueError(f"unknown importance norm {norm!r}; allowed: l1, l2")


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def _set_param(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    setattr(m, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _shrink_out(m: nn.Module, idx: torch.Tensor) -> None:
    _set_param(m, "weight", _take(m.weight, 0, idx))  # type: ignore[arg-type]
    if m.bias is not None:
        _set_param(m, "bias", _take(m.bias, 0, idx))  # type: ignore[arg-type]
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)  # type: ignore[assignment]


def _shrink_in(m: nn.Module, idx: torch.Tensor) -> None:
    _set_param(m, "weight", _take(m.weight, 1, idx))  # type: ignore[arg-type]
    if isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        m.in_channels = len(idx)  # type: ignore[assignment]


def _shrink_norm(m: nn.Module, idx: torch.Tensor) -> None:
    for pname in ("weight", "bias"):
        if getattr(m, pname, None) is not None:
            _set_param(m, pname, _take(getattr(m, pname), 0, idx))
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (len(idx),)
        return
    assert isinstance(m, _BATCHNORMS)
    for bname in ("running_mean", "running_var"):
        if getattr(m, bname, None) is not None:
            setattr(m, bname, _take(getattr(m, bname), 0, idx))
    m.num_features = len(idx)


def prune_structured(
    model: nn.Module,
    amount: float,
    *,
    norm: str = "l1",
    original: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> StructuredResult:
    """Remove the least important ``amount`` of the channels of every prunable group, in place.

    Args:
        model: the model (plain: no pruning masks on it).
        amount: fraction of each group's channels to remove, in ``[0, 1)``; at least one channel
            of every group is kept.
        norm: importance: ``l1`` or ``l2`` norm of each channel's producer weights, or
            ``random``.
        original: widths the fraction refers to, per producer (default: the current widths);
            iterative pruning passes the first widths so that cycle ``i`` reaches its target.
        generator: random source for ``norm="random"``.

    Returns:
        The groups, the kept indices and the widths before and after, per producer.

    Raises:
        ValueError: ``amount`` outside ``[0, 1)``, an unknown ``norm``, masks on the model, no
            prunable group, or a model that ``torch.fx`` cannot trace.

    Example:
        >>> from kiln.models.resnet import ResNet
        >>> net = ResNet(num_classes=10, in_channels=1, depths=(1,), width=8)
        >>> res = prune_structured(net, 0.25)
        >>> res.after
        {'stages.0.0.branch.conv1': 6}
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if norm not in NORMS:
        raise ValueError(f"unknown importance {norm!r}; allowed: {', '.join(NORMS)}")
    if any(name.endswith("_mask") for name, _ in model.named_buffers()):
        raise ValueError(
            "the model carries unstructured pruning masks; make them permanent first "
            "(kiln.compress.prune.core.make_permanent) or prune a plain copy"
        )
    groups = find_groups(model)
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no layer whose outputs can be removed: structured "
            "pruning needs a Linear/Conv that feeds exactly one other Linear/Conv (through "
            "norms and activations only); use unstructured pruning instead"
        )
    modules = dict(model.named_modules())
    result = StructuredResult(groups)
    for g in groups:
        producer = modules[g.producer]
        width = _out_width(producer)
        base = (original or {}).get(g.producer, width)
        keep = max(1, min(width, base - round(amount * base)))
        if norm == "random":
            scores = torch.rand(width, generator=generator)
        else:
            scores = channel_importance(producer, norm)
        # Stable sort: equal scores keep their original order, so the result is deterministic.
        order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
        idx = order[:keep].sort().values
        _shrink_out(producer, idx)
        for n in g.norms:
            _shrink_norm(modules[n], idx)
        _shrink_in(modules[g.consumer], idx)
        result.kept[g.producer] = idx
        result.before[g.producer] = width
        result.after[g.producer] = keep
    return result


def widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The size attributes of every Linear, Conv, BatchNorm and LayerNorm of ``model``.

    Stored with a structured-pruned model, so :func:`resize_` can rebuild its shapes.

    Example:
        >>> widths(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
        {'0': {'in_features': 4, 'out_features': 3}, '1': {'num_features': 3}}
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, _CONVS):
            out[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels}
        elif isinstance(m, _BATCHNORMS):
            out[name] = {"num_features": m.num_features}
        elif isinstance(m, nn.LayerNorm):
            out[name] = {"normalized_shape": list(m.normalized_shape)}
    return out


def resize_(model: nn.Module, sizes: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Give the layers of a freshly built ``model`` the sizes in ``sizes`` (from :func:`widths`).

    The resized tensors are uninitialised: load the pruned weights right after.

    Raises:
        ValueError: a module in ``sizes`` is missing from ``model`` or has another type.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = resize_(net, {"0": {"in_features": 4, "out_features": 1},
        ...                   "2": {"in_features": 1, "out_features": 2}})
        >>> net[2].weight.shape
        torch.Size([2, 1])
    """
    modules = dict(model.named_modules())
    for name, size in sizes.items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"the pruned model names a layer {name!r} that this model lacks")
        if isinstance(m, nn.Linear):
            n_out, n_in = int(size["out_features"]), int(size["in_features"])
        elif isinstance(m, _CONVS):
            n_out, n_in = int(size["out_channels"]), int(size["in_channels"])
        elif isinstance(m, (*_BATCHNORMS, nn.LayerNorm)):
            n = size["num_features"] if "num_features" in size else size["normalized_shape"][0]
            if int(n) != _norm_width(m):
                _shrink_norm(m, torch.zeros(int(n), dtype=torch.long))  # shapes only
            continue
        else:
            raise ValueError(f"cannot resize {name!r}: a {type(m).__name__}")
        if (n_out, n_in) != (_out_width(m), _in_width(m)):
            _resize_layer(m, n_out, n_in)
    return model


def _norm_width(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    return int(m.num_features)  # type: ignore[arg-type]


def _resize_layer(m: nn.Module, n_out: int, n_in: int) -> None:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    if getattr(m, "groups", 1) != 1:
        raise ValueError(f"cannot resize a grouped convolution ({m}); it is never pruned")
    _set_param(m, "weight", w.new_empty((n_out, n_in, *w.shape[2:])))
    if m.bias is not None:
        _set_param(m, "bias", w.new_empty(n_out))
    if isinstance(m, nn.Linear):
        m.in_features, m.out_features = n_in, n_out
    else:
        m.in_channels, m.out_channels = n_in, n_out  # type: ignore[assignment]


def slice_state(
    state: Mapping[str, torch.Tensor],
    kept: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
) -> dict[str, torch.Tensor]:
    """A full-size state dict cut down to the channels ``kept`` (indices into the full widths).

    Used to rewind a structured-pruned model to its initial weights (lottery ticket): the
    survivors take the values they had at initialisation.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> groups = find_groups(net)
        >>> cut = slice_state(net.state_dict(), {"0": torch.tensor([0, 2])}, groups)
        >>> cut["0.weight"].shape, cut["2.weight"].shape
        (torch.Size([2, 2]), torch.Size([1, 2]))
    """
    out = {k: v.detach().clone() for k, v in state.items()}
    for g in groups:
        if g.producer not in kept:
            continue
        idx = kept[g.producer]
        for key in (f"{g.producer}.weight", f"{g.producer}.bias"):
            if key in out:
                out[key] = _take(out[key], 0, idx)
        for n in g.norms:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                if f"{n}.{suffix}" in out:
                    out[f"{n}.{suffix}"] = _take(out[f"{n}.{suffix}"], 0, idx)
        out[f"{g.consumer}.weight"] = _take(out[f"{g.consumer}.weight"], 1, idx)
    return out


def param_count(model: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once).

    Example:
        >>> param_count(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in model.parameters())

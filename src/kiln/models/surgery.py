"""Model surgery for transfer learning: freeze, replace or cut the head, insert adapters.

Fine-tuning a pretrained network on a new task mostly means editing it in a few standard ways:
train only some parts (:func:`freeze` / :func:`unfreeze`), give it a new output layer
(:func:`replace_head`), turn it into a feature extractor (:func:`truncate`), add a few trainable
parameters while the rest stays fixed (:func:`insert_adapter` with an :class:`Adapter`).
Layer-wise learning rates for fine-tuning are in :func:`kiln.models.pretrained.layerwise_lr_decay`.
Every function works on any ``nn.Module`` (Kiln's models or a user's own), edits it in place, and
raises a ``ValueError`` that lists the candidates when a name or type is not found.

Example:
    >>> import torch
    >>> from kiln.models import ResNet
    >>> net = ResNet(num_classes=10, in_channels=1, depths=(1, 1), width=4)
    >>> replace_head(net, 3)
    'fc'
    >>> print(freeze(net, types="BatchNorm2d"))
    froze 12 tensors (72 elements); trainable now 1,247 of 1,319
    >>> net(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from kiln.config import did_you_mean
from kiln.models.summary import count_parameters
from kiln.models.trainable import FreezeReport, _shown, freeze, unfreeze

__all__ = [
    "Adapter",
    "FreezeReport",
    "count_parameters",
    "freeze",
    "insert_adapter",
    "replace_head",
    "truncate",
    "unfreeze",
]


def _module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with a did-you-mean message listing the module names."""
    named = dict(model.named_modules())
    if name not in named:
        names = [n for n in named if n]
        raise ValueError(
            f"{type(model).__name__} has no module {name!r}; {did_you_mean(name, names)}"
            f"modules: {_shown(names)}"
        )
    return named[name]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(_module(model, parent_name), child, new)


# --------------------------------------------------------------------------- head


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


def replace_head(
    model: nn.Module, num_outputs: int, name: str | None = None, *, untie: bool = False
) -> str:
    """Replace the output ``nn.Linear`` with a fresh one of ``num_outputs`` outputs.

    The head is the module called ``name``, or else the **last registered** ``nn.Linear``
    (the last in ``model.named_modules()``): ``fc`` for Kiln's ResNet and MLP, ``lm_head`` for
    the GPT, the last Linear of an ``nn.Sequential``. When the forward calls another Linear
    last, pass its ``name``. The new layer keeps ``in_features``, bias or not, dtype and device,
    and starts with ``nn.Linear``'s default initialisation.

    A head whose weight is tied to another parameter (the GPT's ``lm_head`` shares the token
    embedding) is refused unless ``untie=True``: the new head then has its own weight and the
    embedding keeps the old one, so the model gains ``in_features * num_outputs`` parameters.

    Args:
        model: the model, edited in place.
        num_outputs: outputs of the new head (classes, targets).
        name: dotted name of the Linear to replace (default: the last Linear).
        untie: allow replacing a head whose weight is tied to another parameter.

    Returns:
        The name of the replaced module.

    Raises:
        ValueError: no Linear, ``name`` is not a Linear of the model, ``num_outputs < 1``, or a
            tied head without ``untie=True``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 10)))
        >>> replace_head(net, 3), net[2][0].out_features
        ('2.0', 3)
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be an int >= 1, got {num_outputs!r}")
    linears = _linear_names(model)
    if name is None:
        if not linears:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear to replace; pass the head's name and "
                "replace it yourself, or use truncate() to drop it"
            )
        name = linears[-1]
    old = _module(model, name)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"module {name!r} is a {type(old).__name__}, not an nn.Linear; "
            f"{did_you_mean(name, linears)}Linear modules: {_shown(linears)}"
        )
    prefix = name + "."
    tied = sorted(
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if not n.startswith(prefix) and any(p is q for q in old.parameters())
    )
    if tied and not untie:
        raise ValueError(
            f"the weight of head {name!r} is tied to {', '.join(tied)}; replacing the head "
            "unties them (the new head gets its own weight, the other module keeps the old "
            "one); pass untie=True to do so"
        )
    new = nn.Linear(
        old.in_features,
        num_outputs,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    _set_module(model, name, new)
    return name


# --------------------------------------------------------------------------- truncate


def _trunk(model: nn.Module) -> tuple[str, nn.Module]:
    """The container whose children are the model's layers: descend through lone wrappers."""
    name, container = "", model
    while True:
        children = list(container.named_children())
        if len(children) != 1 or not list(children[0][1].children()):
            return name, container
        child_name, container = children[0]
        name = f"{name}.{child_name}" if name else child_name


def truncate(model: nn.Module, after: str | None = None, *, drop_last: int = 1) -> list[str]:
    """Cut off the last layers (set them to ``nn.Identity``) to get a feature extractor.

    With ``after``, every module registered after the module ``after`` (its later siblings,
    and the later siblings of each of its parents) becomes an Identity, so the model returns
    ``after``'s output. Without it, the last ``drop_last`` children of the model's layer
    container become Identities (the model's direct children, or a lone wrapper's children,
    such as ``self.net = nn.Sequential(...)``). Both assume the forward runs the children in
    registration order, as Kiln's models and ``nn.Sequential`` do; check the output shape.
    Parameter names of the kept layers do not change, so pretrained weights still load
    (with ``strict=False``: the cut layers' keys become unexpected).

    Args:
        model: the model, edited in place.
        after: dotted name of the last module to keep.
        drop_last: how many trailing layers to cut when ``after`` is None.

    Returns:
        The names of the modules replaced by Identity.

    Raises:
        ValueError: ``after`` is not a module, or ``drop_last`` is not in ``[1, layers)``.

    Example:
        >>> import torch
        >>> from kiln.models import MLP
        >>> net = MLP(4, 3, hidden=(8,))
        >>> truncate(net)
        ['fc']
        >>> net(torch.randn(2, 4)).shape
        torch.Size([2, 8])
    """
    if after is not None:
        _module(model, after)
        if after == "":
            raise ValueError("after='' is the model itself; name one of its modules")
        cut: list[str] = []
        parts = after.split(".")
        for depth in reversed(range(len(parts))):  # in definition order: inner ones first
            parent = ".".join(parts[:depth])
            children = [n for n, _ in _module(model, parent).named_children()]
            later = children[children.index(parts[depth]) + 1 :]
            cut += [f"{parent}.{c}" if parent else c for c in later]
    else:
        base, container = _trunk(model)
        children = [n for n, _ in container.named_children()]
        if isinstance(drop_last, bool) or not 1 <= drop_last < len(children):
            raise ValueError(
                f"drop_last must be in [1, {len(children) - 1}] for {type(model).__name__}, "
                f"whose layers are {_shown(children)}; got {drop_last!r}"
            )
        cut = [f"{base}.{c}" if base else c for c in children[-drop_last:]]
    for n in cut:
        _set_module(model, n, nn.Identity())
    return cut


# --------------------------------------------------------------------------- adapters


class Adapter(nn.Module):
    """Bottleneck residual adapter: ``x + up(act(down(x)))`` over one feature dimension.

    The up-projection starts at zero, so an adapter is the identity when inserted and the
    model's outputs do not change until it trains (Houlsby et al., 2019).

    Args:
        dim: size of the feature dimension (``n_embd`` of a transformer, channels of a CNN).
        bottleneck: width of the hidden layer (a few percent of ``dim`` is typical).
        activation: factory of the nonlinearity.
        channel_dim: which input dimension holds the features: ``-1`` for ``(B, T, C)`` or
            ``(N, C)``, ``1`` for ``(N, C, H, W)`` feature maps.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 5, 16)
        >>> torch.equal(Adapter(16, 4)(x), x)
        True
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        activation: Callable[[], nn.Module] = nn.GELU,
        channel_dim: int = -1,
    ) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be >= 1, got {dim} and {bottleneck}")
        self.channel_dim = channel_dim
        self.down = nn.Linear(dim, bottleneck)
        self.act = activation()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape in and out."""
        h = x.movedim(self.channel_dim, -1)
        return x + self.up(self.act(self.down(h))).movedim(-1, self.channel_dim)


def insert_adapter(
    model: nn.Module,
    name: str,
    adapter: nn.Module,
    position: Literal["after", "before"] = "after",
) -> nn.Sequential:
    """Wrap module ``name`` as ``Sequential(base, adapter)`` (or ``(adapter, base)``).

    The wrapped module's parameters move from ``name.*`` to ``name.base.*`` and the adapter's
    are ``name.adapter.*``: load pretrained weights first, then insert adapters. To train only
    the adapters, ``freeze(model, "*")`` then ``unfreeze(model, "*.adapter.*")``.

    Args:
        model: the model, edited in place.
        name: dotted name of the module to wrap.
        adapter: the module to add (e.g. an :class:`Adapter`), on the model's device.
        position: ``"after"`` feeds the module's output to the adapter, ``"before"`` feeds the
            adapter's output to the module.

    Returns:
        The new ``nn.Sequential`` now at ``name``.

    Raises:
        ValueError: ``name`` is not a module of ``model``, or a bad ``position``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> y = net(x)
        >>> _ = insert_adapter(net, "0", Adapter(8, 2))
        >>> torch.equal(net(x), y), [n for n, _ in net.named_parameters()][:3]
        (True, ['0.base.weight', '0.base.bias', '0.adapter.down.weight'])
    """
    if position not in ("after", "before"):
        raise ValueError(
            f"position must be 'after' or 'before', got {position!r}; "
            f"{did_you_mean(position, ['after', 'before'])}".rstrip("; ")
        )
    if name == "":
        raise ValueError("name='' is the model itself; name one of its modules")
    base = _module(model, name)
    pair = [("base", base), ("adapter", adapter)]
    wrapped = nn.Sequential(OrderedDict(pair if position == "after" else pair[::-1]))
    _set_module(model, name, wrapped)
    return wrapped

"""Forward and backward hooks by module name, registered for one block and always removed.

A hook left behind keeps running (and keeping tensors alive) on every later forward pass, and a
``try/finally`` around every registration is easy to forget. Here each registration is a
context manager: hooks are added on entry and removed on exit, also when the forward or the
backward raises. On top of that sit the two captures most inspection needs:

* :func:`capture_activations`: each module's output, by name (forward hooks);
* :func:`capture_gradients`: the gradient of the loss with respect to each module's output,
  by name (``register_full_backward_hook``).

Modules are named as in ``model.named_modules()`` (``stages.0.branch.conv1``); by default
every leaf module (one without children) is hooked.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with capture_activations(net) as acts, capture_gradients(net) as grads:
    ...     net(torch.randn(5, 4)).sum().backward()
    >>> {k: tuple(v.shape) for k, v in acts.items()}
    {'0': (5, 3), '1': (5, 3), '2': (5, 2)}
    >>> tuple(grads["1"].shape), hook_count(net)
    ((5, 3), 0)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kiln.config import did_you_mean

__all__ = [
    "ForwardFn",
    "GradFn",
    "backward_hooks",
    "capture_activations",
    "capture_gradients",
    "first_tensor",
    "forward_hooks",
    "hook_count",
    "no_inplace",
    "select_modules",
]

ForwardFn = Callable[[str, nn.Module, tuple[Any, ...], Any], None]
"""``fn(name, module, inputs, output)``, called after each hooked module's forward."""

GradFn = Callable[[str, nn.Module, tuple[torch.Tensor | None, ...]], None]
"""``fn(name, module, grad_output)``, called when the gradients of a module's outputs are known."""

# torch warns when a full backward hook fires on a module none of whose inputs require grad (the
# first layer, fed a plain input batch). The hook still gets the gradient of the module's
# *output*, which is all we read, so the warning says nothing that matters here.
_NO_INPUT_GRAD = "Full backward hook is firing when gradients are computed with respect to module"


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module returned, or the first one inside a tuple/list/dict output.

    Example:
        >>> first_tensor((torch.zeros(2), torch.ones(3))).shape
        torch.Size([2])
    """
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value
    if isinstance(items, (tuple, list)) or isinstance(value, dict):
        for v in items:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def select_modules(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The modules to hook, by name: the given ones, or every leaf module when ``names`` is None.

    Args:
        model: the model.
        names: dotted module names as in ``model.named_modules()``; ``""`` is the model itself.

    Returns:
        ``{name: module}`` in the model's definition order.

    Raises:
        ValueError: a name is not a module of ``model``; the message suggests the closest one.

    Example:
        >>> from torch import nn
        >>> list(select_modules(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))))
        ['0', '1.0']
    """
    named = dict(model.named_modules())
    if names is None:
        return {n: m for n, m in named.items() if n and not any(True for _ in m.children())}
    wanted = list(names)
    for n in wanted:
        if n not in named:
            did = did_you_mean(n, [k for k in named if k])
            shown = ", ".join(repr(k) for k in list(named)[1:13])
            raise ValueError(
                f"{type(model).__name__} has no module {n!r}; {did}"
                f"names look like: {shown}{', ...' if len(named) > 13 else ''}"
            )
    return {n: named[n] for n in named if n in wanted}


def hook_count(model: nn.Module) -> int:
    """Hooks registered on ``model`` and its submodules (forward, pre-forward, backward).

    Zero after every context manager of this module has exited: a quick leak check.

    Example:
        >>> from torch import nn
        >>> hook_count(nn.Linear(2, 2))
        0
    """
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += len(m._backward_hooks) + len(m._backward_pre_hooks)
    return total


@contextmanager
def forward_hooks(
    model: nn.Module, fn: ForwardFn, names: Iterable[str] | None = None
) -> Iterator[list[str]]:
    """Call ``fn(name, module, inputs, output)`` after each selected module's forward.

    Args:
        model: the model.
        fn: the callback; it must not change ``output`` (its return value is ignored).
        names: modules to hook (default: every leaf module).

    Yields:
        The hooked module names, in definition order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> seen = []
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        >>> with forward_hooks(net, lambda n, m, i, o: seen.append((n, tuple(o.shape)))):
        ...     _ = net(torch.randn(4, 2))
        >>> seen
        [('0', (4, 3)), ('1', (4, 3))]
    """
    modules = select_modules(model, names)
    handles = []
    try:
        for name, module in modules.items():

            def hook(m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                fn(name, m, args, out)

            handles.append(module.register_forward_hook(hook))
        yield list(modules)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def backward_hooks(
    model: nn.Module, fn: GradFn, names: Iterable[str] | None = None
) -> Iterator[list[str]]:
    """Call ``fn(name, module, grad_output)`` during backward, with full backward hooks.

    ``grad_output`` holds the gradient of the loss with respect to each of the module's outputs
    (None for an output that does not reach the loss). Full backward hooks wrap the module's
    inputs and outputs in an autograd Function, which in-place operations on those tensors
    break: run in-place modules (``ReLU(inplace=True)``) under :func:`no_inplace`.

    Args:
        model: the model; run the forward *and* the backward inside the block.
        fn: the callback; it must not change the gradients (its return value is ignored).
        names: modules to hook (default: every leaf module).

    Yields:
        The hooked module names, in definition order.

    Raises:
        ValueError: a hooked module (or one right after it) works in place.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        >>> norms = {}
        >>> def keep(name, module, grad_output):
        ...     norms[name] = grad_output[0].shape
        >>> with backward_hooks(net, keep):
        ...     net(torch.randn(4, 2)).sum().backward()
        >>> norms["0"]
        torch.Size([4, 3])
    """
    modules = select_modules(model, names)
    inplace = [n or "(model)" for n, m in model.named_modules() if getattr(m, "inplace", False)]
    if inplace:
        raise ValueError(
            f"gradient hooks cannot follow in-place modules ({', '.join(inplace[:4])}): torch "
            "forbids in-place changes to the tensors a full backward hook watches; wrap the "
            "block in kiln.inspect.hooks.no_inplace(model)"
        )
    handles = []
    try:
        for name, module in modules.items():

            def hook(
                m: nn.Module,
                grad_input: tuple[torch.Tensor | None, ...],
                grad_output: tuple[torch.Tensor | None, ...],
                name: str = name,
            ) -> None:
                fn(name, m, grad_output)

            handles.append(module.register_full_backward_hook(hook))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_INPUT_GRAD, category=UserWarning)
            yield list(modules)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_activations(
    model: nn.Module, names: Iterable[str] | None = None, *, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture each selected module's output by name, for the forward passes in the block.

    A module that runs several times keeps its last output. Outputs that are tuples or dicts
    (an LSTM's ``(output, state)``) are captured as their first tensor.

    Args:
        model: the model.
        names: modules to capture (default: every leaf module).
        detach: store detached tensors (no graph kept alive); ``False`` keeps them in the
            graph, for gradients with respect to an intermediate output.

    Yields:
        A dict filled as the forward runs: ``{name: output}``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        >>> with capture_activations(net, ["0"]) as acts:
        ...     _ = net(torch.randn(2, 1, 5, 5))
        >>> acts["0"].shape
        torch.Size([2, 4, 3, 3])
    """
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = first_tensor(out)
        if t is not None:
            store[name] = t.detach() if detach else t

    with forward_hooks(model, keep, names):
        yield store


@contextmanager
def capture_gradients(
    model: nn.Module, names: Iterable[str] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the gradient with respect to each selected module's output, by name.

    Run the forward and the backward inside the block. The gradient is that of the module's
    first output (detached); a module whose output does not reach the loss is missing from
    the dict.

    Args:
        model: the model.
        names: modules to capture (default: every leaf module).

    Yields:
        A dict filled as the backward runs: ``{name: d loss / d output}``.

    Raises:
        ValueError: the model has in-place modules (see :func:`backward_hooks`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> with capture_gradients(net) as grads:
        ...     net(torch.randn(4, 3)).sum().backward()
        >>> grads["0"]
        tensor([[1., 1.],
                [1., 1.],
                [1., 1.],
                [1., 1.]])
    """
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, module: nn.Module, grad_output: tuple[torch.Tensor | None, ...]) -> None:
        if grad_output and grad_output[0] is not None:
            store[name] = grad_output[0].detach()

    with backward_hooks(model, keep, names):
        yield store


@contextmanager
def no_inplace(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``inplace`` on every module that has it (``ReLU(inplace=True)``), then restore.

    The results are the same; the forward pass uses a little more memory. Needed for gradient
    hooks (:func:`capture_gradients`) on models built with in-place activations.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True))
        >>> with no_inplace(net):
        ...     net[1].inplace
        False
        >>> net[1].inplace
        True
    """
    changed = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in changed:
        setattr(m, "inplace", False)  # noqa: B010  (an attribute nn.Module does not declare)
    try:
        yield model
    finally:
        for m in changed:
            setattr(m, "inplace", True)  # noqa: B010

"""Activation (gradient) checkpointing: trade recomputation for activation memory.

Backward needs tensors saved during forward (a layer's input, an activation's output, a norm's
statistics). For a deep network these saved activations, not the weights, fill the memory.
Checkpointing a block keeps only the block's *inputs* during forward and recomputes its
internals when backward reaches it, so at most one block's internals are alive at a time. The
price is one extra forward of every checkpointed block (typically +20-35% step time).

:func:`apply_activation_checkpointing` makes chosen submodules run their forward under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. It sets the module instance's
``forward`` attribute instead of wrapping the module in a new parent, so:

* ``state_dict()`` keys do not change: checkpoints load into the model with or without it;
* the change survives ``copy.deepcopy`` (the copy's forward runs the copy's weights) and works
  under ``torch.compile`` and ``DistributedDataParallel``; apply it before wrapping with either
  (``Engine.setup`` wraps last). Wrapped models passed in are unwrapped first.

Correctness details handled here:

* **RNG**: non-reentrant checkpoint stashes the global RNG state before a block's forward and
  restores it for the recomputation (``preserve_rng_state=True``), so dropout and
  :class:`~kiln.models.layers.DropPath` draw the same masks twice and the gradients equal those
  of the plain model with the same seed. The global RNG ends where the plain model leaves it.
* **BatchNorm**: the recomputation runs BatchNorm in training mode a second time, which would
  update ``running_mean``/``running_var``/``num_batches_tracked`` twice per step. In eager mode
  those buffers are saved before the recomputation and restored after it, so the running
  statistics equal the plain model's. (Under ``torch.compile`` the buffer update is part of
  the compiled forward only, so nothing is applied twice.) Other side effects of a checkpointed
  forward (counters, prints, hooks) do happen twice.
* **No grad**: under ``torch.no_grad()``/``inference_mode()`` (evaluation) the plain forward
  runs, with no checkpoint overhead.

What to checkpoint, when ``targets`` is None (:data:`DEFAULT_BLOCKS`): every
:class:`~kiln.models.resnet.BasicBlock`, every :class:`~kiln.models.gpt.TransformerBlock`, and
for an :class:`~kiln.models.mlp.MLP` each hidden layer: the ``Linear -> [norm] -> activation ->
[dropout]`` group that starts at each ``Linear`` of ``mlp.hidden``. Those groups are not modules
of their own (``hidden`` is one flat ``nn.Sequential``, whose keys must not change), so
``hidden``'s forward is replaced by one that runs each group under its own checkpoint; they are
reported as ``hidden[0:2]``, ``hidden[2:4]``, ... (child index ranges, end excluded). Note that
for a plain ReLU MLP (no norm, no dropout) per-layer checkpointing saves nothing: ReLU's saved
output *is* the next Linear's saved input, which the checkpoint keeps anyway. It pays off with
norms, GELU/SiLU/tanh or dropout in the layer (see benchmarks/README.md).

Example:
    >>> import torch
    >>> from kiln.models import ResNet
    >>> net = ResNet(num_classes=10, in_channels=1, depths=(2, 2), width=8)
    >>> apply_activation_checkpointing(net)
    ['stages.0.0', 'stages.0.1', 'stages.1.0', 'stages.1.1']
    >>> net(torch.randn(4, 1, 8, 8)).sum().backward()  # recomputes each block in backward
    >>> remove_activation_checkpointing(net)
    ['stages.0.0', 'stages.0.1', 'stages.1.0', 'stages.1.1']
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from kiln.models.wrappers import unwrap_model

__all__ = [
    "DEFAULT_BLOCKS",
    "apply_activation_checkpointing",
    "is_checkpointed",
    "remove_activation_checkpointing",
]

Target = str | type[nn.Module]

#: What ``targets=None`` checkpoints, by class name (the classes live in ``kiln.models``).
DEFAULT_BLOCKS = ("BasicBlock", "TransformerBlock", "MLP (each hidden Linear group)")

_SHOWN = 8  # names listed in error messages


# ---------------------------------------------------------------------------- the forwards


class _RestoreBatchNormStats:
    """Save BatchNorm running statistics on enter and put them back on exit.

    Used as the recomputation context of a checkpoint, so the second (recomputed) forward of a
    block does not move the running statistics a second time.
    """

    def __init__(self, norms: Sequence[_BatchNorm]) -> None:
        self.norms = norms
        self.saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self) -> None:
        self.saved = [
            [(b, b.detach().clone()) for b in m.buffers(recurse=False)] for m in self.norms
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for pairs in self.saved:
                for buf, copy in pairs:
                    buf.copy_(copy)
        self.saved = []


def _updating_norms(modules: Iterator[nn.Module]) -> list[_BatchNorm]:
    return [
        m for m in modules if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]


def _run_checkpointed(
    fn: Callable[..., Any], norms: list[_BatchNorm], *args: Any, **kwargs: Any
) -> Any:
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)  # evaluation: nothing is saved, so nothing to recompute
    if norms and not torch.compiler.is_compiling():
        restore = _RestoreBatchNormStats(norms)

        def contexts() -> tuple[contextlib.AbstractContextManager[None], _RestoreBatchNormStats]:
            return contextlib.nullcontext(), restore

        return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _checkpointed_forward(
    module: nn.Module, original: Callable[..., Any] | None, *args: Any, **kwargs: Any
) -> Any:
    """The instance ``forward`` of a checkpointed module (bound with ``functools.partial``)."""
    # functools.partial, not a bound method: torch.compile traces partials, not MethodType.
    fn = original if original is not None else functools.partial(type(module).forward, module)
    return _run_checkpointed(fn, _updating_norms(module.modules()), *args, **kwargs)


def _children(seq: nn.Module) -> list[nn.Module]:
    # By position, repeats included (``children()`` would drop a module listed twice).
    return [c for c in seq._modules.values() if c is not None]


def _run_children(seq: nn.Module, start: int, stop: int, x: Any) -> Any:
    for child in _children(seq)[start:stop]:
        x = child(x)
    return x


def _checkpointed_groups(
    seq: nn.Module,
    bounds: tuple[int, ...],
    original: Callable[..., Any] | None,
    input: Any,  # the name nn.Sequential.forward uses
) -> Any:
    """The instance ``forward`` of a Sequential whose child ranges run as separate checkpoints."""
    children = _children(seq)
    x = _run_children(seq, 0, bounds[0], input)  # children before the first group
    for start, stop in itertools.pairwise(bounds):
        norms = _updating_norms(m for c in children[start:stop] for m in c.modules())
        x = _run_checkpointed(functools.partial(_run_children, seq, start, stop), norms, x)
    return _run_children(seq, bounds[-1], len(children), x)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` replaced this module's forward.

    Example:
        >>> from torch import nn
        >>> is_checkpointed(nn.Linear(2, 2))
        False
    """
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func in (
        _checkpointed_forward,
        _checkpointed_groups,
    )


# ---------------------------------------------------------------------------- choosing modules


def _covered(name: str, chosen: Sequence[str]) -> bool:
    """``name`` is one of ``chosen`` or lies inside one of them."""
    return any(c == "" or name == c or name.startswith(c + ".") for c in chosen)


def _outermost(pairs: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop matches nested in another match: the outer checkpoint already covers them."""
    kept: list[tuple[str, nn.Module]] = []
    for name, module in pairs:  # named_modules() lists parents before their children
        if not _covered(name, [n for n, _ in kept]):
            kept.append((name, module))
    return kept


def _mlp_groups(mlp: nn.Module) -> tuple[int, ...]:
    """Child indices of ``mlp.hidden`` where each ``Linear`` group starts, plus the end."""
    hidden = mlp.hidden
    assert isinstance(hidden, nn.Sequential)  # MLP builds it so
    starts = [i for i, c in enumerate(hidden) if isinstance(c, nn.Linear)]
    return (*starts, len(hidden)) if starts else ()


def _candidates(root: nn.Module) -> list[str]:
    """Likely blocks for an error message: parameterised children of list-like containers."""
    names: list[str] = []
    for name, m in root.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            prefix = f"{name}." if name else ""
            names += [
                f"{prefix}{child_name} ({type(child).__name__})"
                for child_name, child in m.named_children()
                if any(True for _ in child.parameters())
            ]
    if not names:
        names = [
            f"{n} ({type(c).__name__})"
            for n, c in root.named_children()
            if any(True for _ in c.parameters())
        ]
    return names


def _shown(items: Sequence[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more if items else "(none)"


def _default_plan(root: nn.Module) -> list[tuple[str, nn.Module, tuple[int, ...] | None]]:
    from kiln.models.gpt import TransformerBlock
    from kiln.models.mlp import MLP
    from kiln.models.resnet import BasicBlock

    kinds = (BasicBlock, TransformerBlock, MLP)
    matches: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in root.named_modules() if isinstance(m, kinds)
    ]
    plan: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []
    for name, m in _outermost(matches):
        if isinstance(m, MLP):
            bounds = _mlp_groups(m)
            if bounds:
                plan.append((f"{name}.hidden" if name else "hidden", m.hidden, bounds))
        else:
            plan.append((name, m, None))
    if not plan:
        containers = sorted(
            {n for n, m in root.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))}
            - {""}
        )
        example = f"targets=['{containers[0]}.*']" if containers else "targets=['layer*']"
        raise ValueError(
            f"apply_activation_checkpointing: {type(root).__name__} has no default blocks to "
            f"checkpoint (defaults: {', '.join(DEFAULT_BLOCKS)}, and an MLP needs hidden "
            f"layers). Pass targets: module-name globs matched against named_modules() names, "
            f"or module classes / class names, e.g. {example} or "
            f"targets=[MyBlock]. Candidate blocks: {_shown(_candidates(root))}"
        )
    return plan


def _normalize(targets: Target | Sequence[Target]) -> list[Target]:
    items: list[Any] = [targets] if isinstance(targets, (str, type)) else list(targets)
    if not items:
        raise ValueError(
            "targets is empty; pass module-name globs (e.g. ['blocks.*']), module classes or "
            "class names, or None for the model's default blocks"
        )
    for t in items:
        if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
            raise TypeError(
                f"each target must be a module-name glob (str), an nn.Module subclass or a "
                f"class name; got {t!r} of type {type(t).__name__}"
            )
    return items


def _matches(name: str, module: nn.Module, targets: Sequence[Target]) -> bool:
    for t in targets:
        if isinstance(t, str):
            if fnmatchcase(name, t) or type(module).__name__ == t:
                return True
        elif isinstance(module, t):
            return True
    return False


def _target_plan(
    root: nn.Module, targets: Sequence[Target]
) -> list[tuple[str, nn.Module, tuple[int, ...] | None]]:
    # The root itself ("") is never matched: checkpointing the whole model keeps every
    # activation alive again during its one recomputation, so it saves no peak memory.
    matches = [(n, m) for n, m in root.named_modules() if n and _matches(n, m, targets)]
    if not matches:
        names = [n for n, _ in root.named_modules() if n]
        classes = sorted({type(m).__name__ for _, m in root.named_modules()})
        raise ValueError(
            f"targets {list(map(_describe, targets))} matched no module of "
            f"{type(root).__name__}. Globs are matched (fnmatch) against named_modules() "
            f"names such as: {_shown(names)}; class names there: {_shown(classes)}. Likely "
            f"blocks: {_shown(_candidates(root))}"
        )
    return [(n, m, None) for n, m in _outermost(matches)]


def _describe(t: Target) -> str:
    return t if isinstance(t, str) else t.__name__


def _group_names(name: str, bounds: tuple[int, ...]) -> list[str]:
    return [f"{name}[{a}:{b}]" for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------- public API


def apply_activation_checkpointing(
    model: nn.Module, targets: Target | Sequence[Target] | None = None
) -> list[str]:
    """Run the forward of chosen submodules under non-reentrant activation checkpointing.

    Only each chosen module's inputs are kept for backward; its internals are recomputed when
    backward reaches it. Parameters, buffers and ``state_dict()`` keys are untouched. Calling
    it again is harmless: modules already checkpointed (or inside one) are not wrapped twice.

    Args:
        model: the network; a ``torch.compile``/DDP-wrapped model is unwrapped (names are those
            of the inner module), but prefer to apply this before wrapping.
        targets: which submodules to checkpoint. None: the model's default blocks (see the
            module docstring; refused for other models, with the candidates listed). Otherwise
            one target or a list of them, each a glob matched with ``fnmatch`` against the
            names of ``model.named_modules()`` (``"blocks.*"``, ``"layer[12]"``; ``*`` also
            matches dots), a module class (matched with ``isinstance``) or a class name
            (``"MyBlock"``). When both a module and one inside it match, only the outer one is
            checkpointed.

    Returns:
        The names of the checkpointed units, in ``named_modules()`` order. An MLP's hidden
        groups are named ``hidden[start:stop]`` (child index ranges of ``hidden``).

    Raises:
        ValueError: ``targets`` is None and the model has no default blocks, or no module
            matches ``targets``; the message lists candidate modules and how to pass them.
        TypeError: a target is neither a string nor an ``nn.Module`` subclass.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layers = nn.ModuleList(
        ...             nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)
        ...         )
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         for layer in self.layers:
        ...             x = layer(x)
        ...         return x
        >>> net = Net()
        >>> apply_activation_checkpointing(net, targets=["layers.*"])
        ['layers.0', 'layers.1', 'layers.2']
        >>> sorted(net.state_dict()) == sorted(Net().state_dict())
        True
    """
    root = unwrap_model(model)
    plan = _default_plan(root) if targets is None else _target_plan(root, _normalize(targets))
    wrapped = [n for n, m in root.named_modules() if is_checkpointed(m)]
    names: list[str] = []
    for name, module, bounds in plan:
        inside = [w for w in wrapped if w != name and _covered(name, [w])]
        if inside:
            continue  # an enclosing module already recomputes this one
        if not is_checkpointed(module):
            original = module.__dict__.get("forward")  # keep a user's own instance forward
            if bounds is None:
                fwd = functools.partial(_checkpointed_forward, module, original)
            else:
                fwd = functools.partial(_checkpointed_groups, module, bounds, original)
            # A plain instance attribute: not a parameter, buffer or submodule, so the
            # state_dict is unchanged, and deepcopy rebinds `module` to the copy.
            module.forward = fwd
        names += [name] if bounds is None else _group_names(name, bounds)
    return names


def remove_activation_checkpointing(model: nn.Module) -> list[str]:
    """Undo :func:`apply_activation_checkpointing` on every module of ``model``.

    Args:
        model: the network (wrappers are unwrapped as in :func:`apply_activation_checkpointing`).

    Returns:
        The names of the modules whose original forward was restored (``hidden`` for an MLP,
        not its groups).

    Example:
        >>> from kiln.models import GPT
        >>> gpt = GPT(vocab_size=8, block_size=4, n_layer=2, n_head=1, n_embd=8)
        >>> apply_activation_checkpointing(gpt)
        ['blocks.0', 'blocks.1']
        >>> remove_activation_checkpointing(gpt)
        ['blocks.0', 'blocks.1']
        >>> remove_activation_checkpointing(gpt)
        []
    """
    restored: list[str] = []
    for name, module in unwrap_model(model).named_modules():
        if is_checkpointed(module):
            fwd = module.__dict__["forward"]
            original = fwd.args[-1]
            if original is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = original
            restored.append(name)
    return restored

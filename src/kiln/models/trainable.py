"""Choose what trains: freeze and unfreeze parameters by name pattern or module type.

A frozen parameter has ``requires_grad=False``: autograd computes no gradient for it, so the
optimizer never updates it, keeps no state for it and applies no weight decay to it (PyTorch
optimizers skip parameters whose ``.grad`` is None). This is the one implementation of
:func:`freeze` and :func:`unfreeze`; ``kiln.models`` and ``kiln.algorithms.freezing`` (the gradual
unfreezing schedule) both export it.

A pattern matches a module name (``"stem"`` selects everything under it), a parameter name, or an
``fnmatch`` glob on parameter names (``"stages.0.*"``); a module type (``nn.BatchNorm2d``, or its
class name ``"BatchNorm2d"`` through ``types=``) selects the parameters modules of that class own
directly. Frozen BatchNorm layers keep updating their running statistics in train mode: keep them
in eval mode with :func:`kiln.algorithms.freezing.frozen_bn_eval`.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> print(freeze(net, ["0", nn.BatchNorm1d]))
    froze 4 tensors (28 elements); trainable now 10 of 38
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from kiln.config import did_you_mean
from kiln.models.summary import count_parameters

__all__ = ["FreezeReport", "freeze", "matching_parameters", "unfreeze"]

TypeSpec = type[nn.Module] | str
Targets = str | type[nn.Module] | Sequence[str | type[nn.Module]] | None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def matching_parameters(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Sorted names of the parameters any of ``patterns`` matches.

    Raises:
        ValueError: a pattern matches nothing (the message lists the top-level modules and the
            closest module name).

    Example:
        >>> from torch import nn
        >>> matching_parameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "1")
        ['1.bias', '1.weight']
    """
    if isinstance(patterns, str):  # one pattern, not a sequence of one-letter patterns
        patterns = [patterns]
    names = [n for n, _ in model.named_parameters()]
    hits: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"a freeze pattern is a string (a module or parameter name or a glob), got "
                f"{type(pattern).__name__}; pass module classes in types="
            )
        found = {n for n in names if _matches(n, pattern)}
        if not found:
            tops = sorted({n.split(".")[0] for n in names})
            hint = did_you_mean(pattern, [n for n, _ in model.named_modules() if n])
            raise ValueError(
                f"freeze pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                f"{hint}top-level modules: {', '.join(tops)} "
                f"(use e.g. '{tops[0]}' or '{tops[0]}.*')"
            )
        hits |= found
    return sorted(hits)


def _shown(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


@dataclass(frozen=True)
class FreezeReport:
    """What a :func:`freeze` or :func:`unfreeze` call changed.

    Attributes:
        action: ``"froze"`` or ``"unfroze"``.
        matched: names of every parameter the targets selected (sorted).
        changed: the part of ``matched`` whose ``requires_grad`` actually flipped.
        changed_elements: elements (``numel``) of the ``changed`` parameters.
        trainable: trainable elements of the model after the call (tied weights once).
        total: all elements of the model (tied weights once).

    Example:
        >>> from torch import nn
        >>> report = freeze(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "0")
        >>> report.changed, report.trainable
        (('0.bias', '0.weight'), 3)
    """

    action: str
    matched: tuple[str, ...]
    changed: tuple[str, ...]
    changed_elements: int
    trainable: int
    total: int

    def __str__(self) -> str:
        head = (
            f"{self.action} {len(self.changed)} tensors ({self.changed_elements:,} elements); "
            f"trainable now {self.trainable:,} of {self.total:,}"
        )
        same = len(self.matched) - len(self.changed)
        return head + (f" ({same} matched tensors were already so)" if same else "")


def _type_names(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()})


def _params_of_types(model: nn.Module, types: Sequence[TypeSpec]) -> list[str]:
    """Names of the parameters owned directly by modules of the given types (or class names)."""
    present = _type_names(model)
    names: list[str] = []
    for spec in types:
        label = spec if isinstance(spec, str) else spec.__name__
        if isinstance(spec, str) and spec not in present:
            raise ValueError(
                f"{type(model).__name__} has no module of type {spec!r}; "
                f"{did_you_mean(spec, present)}types present: {', '.join(present)}"
            )
        found = [
            f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, m in model.named_modules()
            if (type(m).__name__ == spec if isinstance(spec, str) else isinstance(m, spec))
            for p_name, _ in m.named_parameters(recurse=False)
        ]
        if not found:
            raise ValueError(
                f"no parameter of {type(model).__name__} belongs to a module of type {label!r}; "
                f"types present: {', '.join(present)}"
            )
        names += found
    return names


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, type)):  # one name or one class, never iterated letter by letter
        return [value]
    return list(value)


def _set_trainable(
    model: nn.Module,
    names: Targets,
    types: TypeSpec | Sequence[TypeSpec] | None,
    flag: bool,
) -> FreezeReport:
    selected = _as_list(names)
    # Module classes may come with the names: freeze(net, ["stem", nn.BatchNorm2d]).
    patterns: list[str] = [t for t in selected if not isinstance(t, type)]
    type_specs: list[TypeSpec] = [t for t in selected if isinstance(t, type)] + _as_list(types)
    if not patterns and not type_specs:
        raise ValueError(
            "give parameter-name patterns (e.g. 'stem' or 'stages.0.*') and/or module types "
            "(e.g. nn.BatchNorm2d or types='LayerNorm') to select what to change"
        )
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = set(matching_parameters(model, patterns)) if patterns else set()
    chosen.update(_params_of_types(model, type_specs))
    matched = sorted(chosen)
    params = dict(model.named_parameters())
    for n in matched:
        params[n].requires_grad_(flag)
    changed = tuple(n for n in matched if before[n] != flag)
    counts = count_parameters(model)
    return FreezeReport(
        action="unfroze" if flag else "froze",
        matched=tuple(matched),
        changed=changed,
        changed_elements=sum(params[n].numel() for n in changed),
        trainable=counts.trainable,
        total=counts.total,
    )


def freeze(
    model: nn.Module,
    names: Targets = None,
    *,
    types: TypeSpec | Sequence[TypeSpec] | None = None,
) -> FreezeReport:
    """Stop training the selected parameters (``requires_grad=False``).

    A name pattern matches a module name (``"stem"`` selects everything under it), a parameter
    name, or an ``fnmatch`` glob on parameter names (``"stages.0.*"``). A type selects the
    parameters that modules of that class own directly. The optimizer
    built by :func:`kiln.train.optim.build_optimizer` leaves frozen parameters out; build it
    after freezing. Keep frozen BatchNorm layers in eval mode with
    :func:`kiln.algorithms.freezing.frozen_bn_eval`.

    Args:
        model: the model, edited in place.
        names: one pattern or a list of them (module or parameter names, globs); module classes
            may be mixed in (``["stem", nn.BatchNorm2d]``).
        types: module classes (``nn.BatchNorm2d``) or class names (``"LayerNorm"``).

    Returns:
        What changed, with the trainable count after the call; ``print()`` it.

    Raises:
        ValueError: nothing selected, or a pattern or type matches no parameter (the message
            lists the candidates).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> freeze(net, "0", types=nn.LayerNorm).changed
        ('0.bias', '0.weight', '1.bias', '1.weight')
    """
    return _set_trainable(model, names, types, False)


def unfreeze(
    model: nn.Module,
    names: Targets = None,
    *,
    types: TypeSpec | Sequence[TypeSpec] | None = None,
) -> FreezeReport:
    """Train the selected parameters again (``requires_grad=True``); see :func:`freeze`.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = freeze(net, "*")
        >>> print(unfreeze(net, "1"))
        unfroze 2 tensors (10 elements); trainable now 10 of 30
    """
    return _set_trainable(model, names, types, True)

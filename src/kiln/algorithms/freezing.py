"""Layer freezing and gradual unfreezing by parameter-name patterns.

A frozen parameter has ``requires_grad=False``: autograd computes no gradient for it, so the
optimizer never updates it, keeps no state for it and applies no weight decay to it (PyTorch
optimizers skip parameters whose ``.grad`` is None). BatchNorm layers whose weights are all
frozen are kept in eval mode, so their running statistics stay those of the pretrained model.

Patterns match a parameter name with ``fnmatch`` or a module name (a prefix of the parameter
name), so ``"stem"``, ``"stem.*"`` and ``"stem.0.weight"`` all work.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> freeze(net, ["0", "1"])
    ['0.bias', '0.weight', '1.bias', '1.weight']
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Freezer", "freeze", "frozen_bn_eval", "matching_parameters", "unfreeze"]


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def matching_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Sorted names of the parameters any of ``patterns`` matches.

    Raises:
        ValueError: a pattern matches nothing (the message lists the top-level modules).
    """
    names = [n for n, _ in model.named_parameters()]
    hits: set[str] = set()
    for pattern in patterns:
        found = {n for n in names if _matches(n, pattern)}
        if not found:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"freeze pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                f"top-level modules: {', '.join(tops)} (use e.g. '{tops[0]}' or '{tops[0]}.*')"
            )
        hits |= found
    return sorted(hits)


def _set(model: nn.Module, patterns: Sequence[str], flag: bool) -> list[str]:
    names = matching_parameters(model, patterns)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(flag)
    return names


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on matching parameters; returns their names."""
    return _set(model, patterns, False)


def unfreeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=True`` on matching parameters; returns their names."""
    return _set(model, patterns, True)


def frozen_bn_eval(model: nn.Module) -> list[str]:
    """Put BatchNorm layers whose parameters are all frozen in eval mode; returns their names.

    Call it after every ``model.train()``. A BatchNorm without affine parameters is left alone.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params) and m.training:
                m.eval()
                names.append(name)
    return names


class Freezer:
    """Freeze at the start, unfreeze group by group at chosen epochs (gradual unfreezing).

    The state is a function of the epoch, so resuming only needs the epoch: :meth:`apply`
    replays the schedule up to it.

    Args:
        frozen: patterns frozen from the start.
        unfreeze_at: epoch (0-based) -> patterns unfrozen at the start of that epoch.
        bn_eval: keep fully frozen BatchNorm layers in eval mode.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> f = Freezer(["0"], {2: ["0"]})
        >>> f.apply(net, epoch=0)
        >>> net[0].weight.requires_grad
        False
        >>> f.apply(net, epoch=2)
        >>> net[0].weight.requires_grad
        True
    """

    def __init__(
        self,
        frozen: Sequence[str],
        unfreeze_at: Mapping[int, Sequence[str]] | None = None,
        *,
        bn_eval: bool = True,
    ) -> None:
        self.frozen = list(frozen)
        self.unfreeze_at = {int(k): list(v) for k, v in (unfreeze_at or {}).items()}
        self.bn_eval = bn_eval
        if any(e < 0 for e in self.unfreeze_at):
            raise ValueError(f"freeze.unfreeze_at epochs must be >= 0, got {self.unfreeze_at}")

    @property
    def dynamic(self) -> bool:
        """Whether the trained set of parameters changes during the run."""
        return bool(self.unfreeze_at)

    def check(self, model: nn.Module) -> None:
        """Raise a clear ValueError now if any pattern matches nothing."""
        matching_parameters(model, self.frozen)
        for patterns in self.unfreeze_at.values():
            matching_parameters(model, patterns)

    def apply(self, model: nn.Module, epoch: int) -> list[str]:
        """Set ``requires_grad`` as the schedule says at the start of ``epoch``.

        Returns the names whose state changed compared with before the call.
        """
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        if self.frozen:
            freeze(model, self.frozen)
        for at in sorted(self.unfreeze_at):
            if at <= epoch:
                unfreeze(model, self.unfreeze_at[at])
        return [n for n, p in model.named_parameters() if p.requires_grad != before[n]]

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, then frozen BatchNorm layers back to eval (when ``bn_eval``)."""
        model.train()
        if self.bn_eval:
            frozen_bn_eval(model)

"""Gradual unfreezing: a schedule of which parameters train at each epoch (:class:`Freezer`).

Freezing itself has one implementation, :func:`kiln.models.freeze` / :func:`kiln.models.unfreeze`
(re-exported here): a pattern (a string or a list of strings) matches a module name, a parameter
name or an ``fnmatch`` glob, a module class selects the parameters modules of that type own, and
the result is a :class:`kiln.models.FreezeReport`. BatchNorm layers whose weights are all frozen
are kept in eval mode by :func:`frozen_bn_eval`, so their running statistics stay those of the
pretrained model.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> freeze(net, ["0", "1"]).changed
    ('0.bias', '0.weight', '1.bias', '1.weight')
    >>> freeze(net, "2").matched  # one pattern as a plain string
    ('2.bias', '2.weight')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kiln.models.trainable import FreezeReport, freeze, matching_parameters, unfreeze

__all__ = [
    "FreezeReport",
    "Freezer",
    "freeze",
    "frozen_bn_eval",
    "matching_parameters",
    "unfreeze",
]


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


def _patterns(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


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
        >>> _ = f.apply(net, epoch=0)
        >>> net[0].weight.requires_grad
        False
        >>> _ = f.apply(net, epoch=2)
        >>> net[0].weight.requires_grad
        True
    """

    def __init__(
        self,
        frozen: str | Sequence[str],
        unfreeze_at: Mapping[int, str | Sequence[str]] | None = None,
        *,
        bn_eval: bool = True,
    ) -> None:
        self.frozen = _patterns(frozen)
        self.unfreeze_at = {int(k): _patterns(v) for k, v in (unfreeze_at or {}).items()}
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
            if at <= epoch and self.unfreeze_at[at]:
                unfreeze(model, self.unfreeze_at[at])
        return [n for n, p in model.named_parameters() if p.requires_grad != before[n]]

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, then frozen BatchNorm layers back to eval (when ``bn_eval``)."""
        model.train()
        if self.bn_eval:
            frozen_bn_eval(model)

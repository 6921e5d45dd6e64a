"""Parameter counts of a model: total, trainable, frozen, and per module at a chosen depth.

Why not ``sum(p.numel() for p in model.parameters())`` alone: it gives one number, and
written over ``named_parameters(remove_duplicate=False)`` or per module it counts a tied
weight (a language model's embedding and output head) twice. Here every parameter tensor is
counted once, in the first module that owns it; a later owner shows it under ``shared`` (not
added to any total). A Siamese network's tower, or any module registered twice, is counted once
the same way.

Example:
    >>> from kiln.models import GPT
    >>> counts = count_parameters(GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))
    >>> counts.total, counts.row("lm_head").shared  # the head reuses the 10 x 8 embedding
    (1000, 80)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

__all__ = ["ModuleCount", "ParamCount", "count_parameters", "describe_layers"]


@dataclass(frozen=True)
class ModuleCount:
    """The parameters of one module (and its children) in a :class:`ParamCount`.

    Attributes:
        name: the module's dotted name in the model (``blocks.0``); ``""`` for parameters the
            root module owns directly.
        type: the module's class name.
        total: elements of the parameters counted here (those seen first in this module).
        trainable: the part of ``total`` with ``requires_grad=True``.
        shared: elements of parameters this module uses but an earlier module already counted
            (tied or shared weights); not part of ``total``.

    Example:
        >>> ModuleCount("fc", "Linear", total=10, trainable=10, shared=0).frozen
        0
    """

    name: str
    type: str
    total: int
    trainable: int
    shared: int

    @property
    def frozen(self) -> int:
        """Elements with ``requires_grad=False``."""
        return self.total - self.trainable


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model; ``str()`` renders them as a table.

    Attributes:
        total: elements of all distinct parameters.
        trainable: elements with ``requires_grad=True``.
        frozen: elements with ``requires_grad=False``.
        buffers: elements of all distinct buffers (running statistics, masks, ...), which are
            state but not parameters.
        depth: the module depth of ``rows`` (1: the model's direct children).
        rows: one :class:`ModuleCount` per module at ``depth`` (or a shallower leaf), in
            definition order; their ``total`` add up to ``total``.

    Example:
        >>> from torch import nn
        >>> counts = count_parameters(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
        >>> counts.total, [r.total for r in counts.rows]
        (21, [16, 0, 5])
    """

    total: int
    trainable: int
    frozen: int
    buffers: int
    depth: int
    rows: tuple[ModuleCount, ...]

    def row(self, name: str) -> ModuleCount:
        """The row of the module called ``name``.

        Raises:
            KeyError: no row has that name; the message lists the names.

        Example:
            >>> from torch import nn
            >>> count_parameters(nn.Sequential(nn.Linear(2, 2))).row("0").total
            6
        """
        for r in self.rows:
            if r.name == name:
                return r
        names = ", ".join(repr(r.name) for r in self.rows)
        raise KeyError(f"no module {name!r} at depth {self.depth}; rows: {names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) of every field, rows included."""
        return asdict(self)

    def __str__(self) -> str:
        header = ("module", "type", "params", "trainable", "shared")
        lines = [
            (r.name or "(own)", r.type, f"{r.total:,}", f"{r.trainable:,}", f"{r.shared:,}")
            for r in self.rows
        ]
        footer = ("total", "", f"{self.total:,}", f"{self.trainable:,}", "")
        widths = [max(len(row[i]) for row in (header, *lines, footer)) for i in range(5)]

        def fmt(row: tuple[str, ...]) -> str:
            left = [row[i].ljust(widths[i]) for i in range(2)]
            right = [row[i].rjust(widths[i]) for i in range(2, 5)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join(
            [
                fmt(header),
                rule,
                *(fmt(line) for line in lines),
                rule,
                fmt(footer),
                f"trainable {self.trainable:,} | frozen {self.frozen:,} | buffers {self.buffers:,}",
            ]
        )


def _depth(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def count_parameters(model: nn.Module, depth: int = 1) -> ParamCount:
    """Count ``model``'s parameters, each distinct tensor once, overall and per module.

    Args:
        model: any ``nn.Module`` (unwrap DDP / ``torch.compile`` first to get clean names).
        depth: which modules get a row: 1 for the direct children (``stem``, ``stages``,
            ``fc``), 2 for their children (``stages.0``), and so on. A leaf shallower than
            ``depth`` gets its own row; parameters a container owns directly (not through a
            child) get a row named after the container (``""`` for the root).

    Returns:
        The counts; ``print()`` it for a table.

    Raises:
        ValueError: ``depth < 1``.
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from kiln.models import ResNet
        >>> counts = count_parameters(ResNet(num_classes=2, in_channels=1, depths=(1,), width=4))
        >>> [(r.name, r.total) for r in counts.rows]
        [('stem', 44), ('stages', 304), ('pool', 0), ('drop', 0), ('fc', 10)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters needs an nn.Module, got {type(model).__name__!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(
            f"depth must be an int >= 1 (1 = the model's direct children), got {depth!r}"
        )

    def key(module_name: str) -> str:
        return ".".join(module_name.split(".")[:depth]) if module_name else ""

    # Row order: modules in definition order. Every module visit (also a repeated one) may add a
    # row, so a module registered twice shows its second place with everything under "shared".
    order: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        owns = bool(m._parameters) or bool(m._buffers)
        if (name and _depth(name) <= depth and (_depth(name) == depth or not m._modules)) or owns:
            order.setdefault(key(name), type(m).__name__)
    totals = {k: [0, 0, 0] for k in order}  # total, trainable, shared
    seen: set[int] = set()
    total = trainable = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = key(name.rpartition(".")[0])
        row = totals[owner]  # its module owns a parameter, so it has a row
        if id(p) in seen:
            row[2] += p.numel()
            continue
        seen.add(id(p))
        row[0] += p.numel()
        total += p.numel()
        if p.requires_grad:
            row[1] += p.numel()
            trainable += p.numel()
    buffers = sum(b.numel() for b in model.buffers())  # buffers() already skips repeats
    rows = tuple(ModuleCount(k, order[k], *totals[k]) for k in order)
    return ParamCount(total, trainable, total - trainable, buffers, depth, rows)


def describe_layers(model: nn.Module) -> str:
    """Leaf layer types and counts, most common first: ``"Conv2d x6, BatchNorm2d x6, ..."``.

    Example:
        >>> describe_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
        'Linear x2, ReLU x1'
    """
    counts = Counter(
        type(m).__name__ for m in model.modules() if not list(m.children()) and m is not model
    )
    if not counts and not list(model.children()):
        counts[type(model).__name__] += 1
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common()) or "no layers"

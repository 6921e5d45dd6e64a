"""A model summary for one batch: every module's output shape, parameters and MACs.

Parameters come from :func:`kiln.models.summary.count_parameters` (each tensor counted once,
tied weights shown as shared), output shapes from forward hooks, and multiply-accumulates from
``torch.utils.flop_counter.FlopCounterMode`` over the same forward pass: ``MACs = FLOPs / 2``.

What the MAC count covers: the operations FlopCounterMode has formulas for, that is matrix
products (``nn.Linear``, ``matmul``, ``bmm``, ``addmm``), convolutions (every ``nn.ConvNd`` and
transposed convolution) and attention (``scaled_dot_product_attention``). Elementwise work
(activations, normalisation, residual adds, pooling) counts 0, and biases are not counted; for
the networks Kiln trains those are a small share of the time. A Linear layer of ``in`` inputs
and ``out`` outputs costs ``batch * in * out`` MACs; a ``Conv2d`` costs
``batch * C_out * H_out * W_out * C_in / groups * kH * kW``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> s = model_summary(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(2, 8))
    >>> s.row("0").macs, s.row("0").output_shape, s.total_params
    (64, (2, 4), 36)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.inspect.hooks import first_tensor, forward_hooks
from kiln.models.summary import ModuleCount, count_parameters

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["MAC_METHOD", "ModelSummary", "SummaryRow", "count_macs", "model_summary"]

MAC_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one forward pass, MACs = FLOPs / 2; "
    "counts matmul/linear, convolution and attention; elementwise ops, norms, pooling and "
    "biases count 0"
)


@dataclass(frozen=True)
class SummaryRow:
    """One module of a :class:`ModelSummary`.

    Attributes:
        name: dotted module name.
        type: class name.
        depth: nesting depth (1 for the model's direct children).
        output_shape: shape of its output (first tensor) in the summarised pass; None when it
            did not run.
        params: parameter elements in it and its children (each tensor counted once).
        trainable: the part of ``params`` with ``requires_grad=True``.
        shared: elements of parameters it uses that an earlier module already counted.
        macs: multiply-accumulates in it and its children, for the whole batch.

    Example:
        >>> SummaryRow("fc", "Linear", 1, (2, 3), 12, 12, 0, 24).frozen
        0
    """

    name: str
    type: str
    depth: int
    output_shape: tuple[int, ...] | None
    params: int
    trainable: int
    shared: int
    macs: int

    @property
    def frozen(self) -> int:
        """Parameter elements with ``requires_grad=False``."""
        return self.params - self.trainable


@dataclass(frozen=True)
class ModelSummary:
    """:func:`model_summary` 's result.

    Attributes:
        model: the model's class name.
        input_shape: shape of the batch it was run on.
        output_shape: shape of the model's output (first tensor).
        rows: one :class:`SummaryRow` per module, in definition order.
        total_params: elements of all distinct parameters.
        trainable_params: of which ``requires_grad=True``.
        buffers: elements of all buffers (BatchNorm statistics, masks).
        total_macs: multiply-accumulates of the whole forward pass for the batch.
        mac_method: how the MACs were counted.

    Example:
        >>> s = model_summary(nn.Linear(3, 2), torch.randn(4, 3))
        >>> s.total_macs, s.rows
        (24, ())
    """

    model: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    rows: tuple[SummaryRow, ...]
    total_params: int
    trainable_params: int
    buffers: int
    total_macs: int
    mac_method: str = MAC_METHOD

    def row(self, name: str) -> SummaryRow:
        """The row of the module called ``name``.

        Raises:
            KeyError: no such module; the message lists a few names.
        """
        for r in self.rows:
            if r.name == name:
                return r
        shown = ", ".join(r.name for r in self.rows[:12])
        raise KeyError(f"no module {name!r} in the summary; rows: {shown}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-ready."""
        return asdict(self)

    def table(self) -> Table:
        """The summary as a ``rich`` table (names indented by depth, a total row).

        Example:
            >>> from rich.console import Console
            >>> s = model_summary(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3))
            >>> Console(width=100).print(s.table())  # doctest: +SKIP
        """
        from rich.table import Table

        t = Table(title=f"{self.model}: one batch of {list(self.input_shape)}", show_footer=True)
        t.add_column("module", footer="total")
        t.add_column("type")
        t.add_column("output shape", footer=_shape(self.output_shape))
        t.add_column("params", justify="right", footer=f"{self.total_params:,}")
        t.add_column("trainable", justify="right", footer=f"{self.trainable_params:,}")
        t.add_column("MACs", justify="right", footer=human(self.total_macs))
        for r in self.rows:
            params = f"{r.params:,}" + (f" (+{r.shared:,} shared)" if r.shared else "")
            t.add_row(
                "  " * (r.depth - 1) + r.name,
                r.type,
                _shape(r.output_shape),
                params,
                f"{r.trainable:,}",
                human(r.macs) if r.macs else "-",
            )
        return t


def human(n: float) -> str:
    """``1234567`` -> ``1.23M``: a count in thousands (K), millions (M) or billions (G).

    Example:
        >>> human(1234567), human(950)
        ('1.23M', '950')
    """
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else str(list(shape))


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def count_macs(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """Multiply-accumulates of ``model(*inputs)`` per module, from FlopCounterMode.

    Runs one forward pass without gradients. ``""`` is the whole model; a module called twice
    counts both calls. See the module docstring for what is counted.

    Returns:
        ``{module name: MACs}`` for the model and the modules that ran counted operations.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 5))
        >>> count_macs(net, torch.randn(4, 1, 5, 5))  # 4*2*3*3*(1*3*3), 4*18*5
        {'': 1008, '0': 648, '2': 360}
    """
    return _macs_and_output(model, inputs)[0]


def _macs_and_output(model: nn.Module, args: tuple[Any, ...]) -> tuple[dict[str, int], Any]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        output = model(*args)
    # FlopCounterMode names a module by its path from the outermost module it saw run, starting
    # with that module's class name ("ResNet.stages.0"); "Global" is everything.
    root = type(model).__name__
    macs: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1 :]
        else:
            continue  # the root itself (same as Global) or a module run outside the model
        macs[name] = sum(ops.values()) // 2
    return dict(sorted(macs.items(), key=lambda kv: (kv[0] != "", kv[0]))), output


def _param_rows(model: nn.Module, depth: int) -> dict[str, ModuleCount]:
    # count_parameters(model, d) gives each module at depth d its whole subtree: ask once per
    # depth and keep, for every module, the answer at its own depth.
    rows: dict[str, ModuleCount] = {}
    for d in range(1, depth + 1):
        for r in count_parameters(model, d).rows:
            if _depth(r.name) == d:
                rows[r.name] = r
    return rows


def model_summary(
    model: nn.Module, inputs: torch.Tensor | tuple[Any, ...], *, max_depth: int | None = None
) -> ModelSummary:
    """Summarise ``model`` on one batch: shapes, parameter counts and MACs per module.

    Runs ``model(*inputs)`` once without gradients (in the model's current train/eval mode)
    with forward hooks and FlopCounterMode. The hooks are removed afterwards.

    Args:
        model: the model.
        inputs: the batch: a tensor, or a tuple of positional arguments.
        max_depth: only rows for modules at most this deep (default: every module).

    Returns:
        The summary; ``summary.table()`` renders it with rich.

    Raises:
        ValueError: ``max_depth < 1``.

    Example:
        >>> from kiln.models import ResNet
        >>> net = ResNet(num_classes=3, in_channels=1, depths=(1,), width=4)
        >>> s = model_summary(net, torch.randn(2, 1, 8, 8), max_depth=1)
        >>> [(r.name, r.output_shape) for r in s.rows]  # doctest: +NORMALIZE_WHITESPACE
        [('stem', (2, 4, 8, 8)), ('stages', (2, 4, 8, 8)), ('pool', (2, 4)), ('drop', (2, 4)),
         ('fc', (2, 3))]
    """
    if max_depth is not None and max_depth < 1:
        raise ValueError(f"max_depth must be >= 1 (or None for every module), got {max_depth}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    named = [(n, m) for n, m in model.named_modules() if n]
    depth = max((_depth(n) for n, _ in named), default=1)
    if max_depth is not None:
        named = [(n, m) for n, m in named if _depth(n) <= max_depth]
    shapes: dict[str, tuple[int, ...]] = {}

    def keep_shape(name: str, module: nn.Module, _: tuple[Any, ...], out: Any) -> None:
        t = first_tensor(out)
        if t is not None:
            shapes[name] = tuple(t.shape)

    with forward_hooks(model, keep_shape, [n for n, _ in named]):
        macs, output = _macs_and_output(model, args)
    counts = count_parameters(model)
    params = _param_rows(model, min(depth, max_depth or depth))
    rows = []
    for n, m in named:
        p = params.get(n)
        rows.append(
            SummaryRow(
                name=n,
                type=type(m).__name__,
                depth=_depth(n),
                output_shape=shapes.get(n),
                params=p.total if p else 0,
                trainable=p.trainable if p else 0,
                shared=p.shared if p else 0,
                macs=macs.get(n, 0),
            )
        )
    first = first_tensor(args)
    result = first_tensor(output)
    return ModelSummary(
        model=type(model).__name__,
        input_shape=tuple(first.shape) if first is not None else (),
        output_shape=tuple(result.shape) if result is not None else None,
        rows=tuple(rows),
        total_params=counts.total,
        trainable_params=counts.trainable,
        buffers=counts.buffers,
        total_macs=macs.get("", 0),
    )

"""A multi-layer perceptron for tabular data, or any input once flattened.

The default model of a Kiln job: small, fast on a CPU, and enough for the embedded digits data.
Inputs of any shape are flattened first, so the same class serves ``(64,)`` features and
``(1, 8, 8)`` images.

Example:
    >>> import torch
    >>> net = MLP(in_features=64, out_features=10, hidden=(32,))
    >>> net(torch.randn(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from kiln.config import did_you_mean

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = ["MLP", "build_mlp"]

Activation = Literal["relu", "gelu", "silu", "tanh"]
Norm = Literal["none", "batch", "layer"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_NORMS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "batch": nn.BatchNorm1d,
    "layer": nn.LayerNorm,
}


def _choice(kind: str, value: str, table: Mapping[str, object]) -> None:
    if value not in table:
        raise ValueError(
            f"unknown {kind} {value!r}; {did_you_mean(value, list(table))}"
            f"allowed: {', '.join(table)}"
        )


class MLP(nn.Module):
    """Flatten, then ``Linear -> [norm] -> activation -> [dropout]`` per hidden layer, then a
    final ``Linear`` (``self.fc``) to ``out_features``.

    Args:
        in_features: size of one flattened input example.
        out_features: outputs per example (classes, regression targets).
        hidden: widths of the hidden layers; empty for a linear model.
        dropout: dropout probability after each hidden activation (0 disables it).
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        norm: ``none``, ``batch`` (BatchNorm1d) or ``layer`` (LayerNorm), before the activation.

    Example:
        >>> import torch
        >>> net = MLP(20, 3, hidden=(16, 16), activation="gelu", norm="layer", dropout=0.1)
        >>> net(torch.randn(4, 20)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        activation: Activation = "relu",
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        _choice("activation", activation, _ACTIVATIONS)
        _choice("norm", norm, _NORMS)
        widths = list(hidden)
        for n in (in_features, out_features, *widths):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(
                    f"MLP sizes must be positive integers; got in_features={in_features}, "
                    f"out_features={out_features}, hidden={widths}"
                )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        norm_cls = _NORMS[norm]
        for width in widths:
            layers.append(nn.Linear(prev, width))
            if norm_cls is not None:
                layers.append(norm_cls(width))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, *input_shape)`` to ``(N, out_features)``."""
        return self.fc(self.hidden(self.flatten(x)))


def build_mlp(
    info: DataInfo,
    *,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
    activation: Activation = "relu",
    norm: Norm = "none",
) -> MLP:
    """An :class:`MLP` sized by the data: flattened inputs in, one output per class or target.

    Args:
        info: the data's description; ``task`` must be classification or regression.
        hidden: see :class:`MLP`.
        dropout: see :class:`MLP`.
        activation: see :class:`MLP`.
        norm: see :class:`MLP`.

    Raises:
        ValueError: the task is ``lm``, or classification data without ``num_classes``.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> net = build_mlp(DataInfo("regression", (8,), num_outputs=2), hidden=(16,))
        >>> net.fc.out_features
        2
    """
    if info.task == "classification":
        if info.num_classes is None:
            raise ValueError("classification data must say num_classes to size the MLP output")
        out_features = info.num_classes
    elif info.task == "regression":
        out_features = info.num_outputs
    else:
        raise ValueError(
            f"model 'mlp' does not handle task {info.task!r}; use model.name=gpt for language "
            "modelling"
        )
    return MLP(
        math.prod(info.input_shape),
        out_features,
        hidden=hidden,
        dropout=dropout,
        activation=activation,
        norm=norm,
    )

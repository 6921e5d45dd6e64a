"""A model that turns its output to NaN on chosen forward calls, for the non-finite policy tests.

Example:
    >>> import torch
    >>> model = NaNModel(bad_calls=(2,))
    >>> bool(model(torch.ones(1, 64)).isnan().any()), bool(model(torch.ones(1, 64)).isnan().any())
    (False, True)
"""

from __future__ import annotations

import torch
from torch import nn


class NaNModel(nn.Module):
    """An MLP (``in_features`` -> 16 -> ``num_classes``) whose output is NaN when asked.

    Args:
        bad_calls: training-mode forward calls (counted from 1) whose output is NaN.
        eval_nan: every eval-mode forward returns NaN.
        in_features: input size after flattening (64 for the digits data).
        num_classes: output size.
    """

    def __init__(
        self,
        bad_calls: range | tuple[int, ...] = (),
        *,
        eval_nan: bool = False,
        in_features: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(in_features, 16)
        self.fc = nn.Linear(16, num_classes)
        self.bad_calls, self.eval_nan, self.calls = bad_calls, eval_nan, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(torch.relu(self.hidden(self.flatten(x))))
        if self.training:
            self.calls += 1
            if self.calls in self.bad_calls:
                out = out * float("nan")
        elif self.eval_nan:
            out = out * float("nan")
        return out

"""``kiln.doctor``: check a training loop for common mistakes (see :mod:`kiln.perf.doctor`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import kiln.doctor
    >>> model = nn.Linear(4, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> def step(x):
    ...     model(x).sum().backward()
    ...     opt.step()
    ...     opt.zero_grad()
    >>> kiln.doctor.check(model, [torch.randn(2, 4)] * 3, step)
    []
"""

from kiln.perf.doctor import check
from kiln.perf.doctor_findings import Finding

__all__ = ["Finding", "check"]

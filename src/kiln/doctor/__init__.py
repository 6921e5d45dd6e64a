"""``kiln.doctor``: run a few instrumented steps of a loop and report its common mistakes.

* :mod:`kiln.doctor.steps`: :func:`check`, the instrumented steps.
* :mod:`kiln.doctor.checks`, :mod:`kiln.doctor.sites`: static checks and where each finding points.
* :mod:`kiln.doctor.probe`: ``kiln doctor CONFIG`` runs a job's real step under :func:`check`.
* :mod:`kiln.doctor.findings`, :mod:`kiln.doctor.threads`: findings and the host-load check.

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

from kiln.doctor.findings import Finding
from kiln.doctor.steps import check

__all__ = ["Finding", "check"]

"""Look inside a model: hooks, summaries, per-layer statistics, saliency maps, NaN hunting.

One concept per module, each usable alone in a user's own loop:

* :mod:`kiln.inspect.hooks`: forward/backward hooks by module name that are always removed;
  :func:`capture_activations`, :func:`capture_gradients`.
* :mod:`kiln.inspect.summary`: :func:`model_summary` (output shapes, parameters, MACs).
* :mod:`kiln.inspect.stats`: :func:`layer_stats` (mean, std, zeros, dead units, NaN/Inf).
* :mod:`kiln.inspect.saliency`: vanilla gradient, gradient x input, SmoothGrad, Grad-CAM.
* :mod:`kiln.inspect.anomaly`: :class:`NonFiniteGuard`, :func:`detect_anomaly`.
* :mod:`kiln.inspect.plots`: histogram and saliency PNGs (matplotlib, no pyplot state).

``kiln inspect RUN|CONFIG`` runs them all on one batch (see ``docs/techniques/inspect.md``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with capture_activations(net, ["1"]) as acts:
    ...     _ = net(torch.randn(5, 4))
    >>> acts["1"].shape
    torch.Size([5, 3])
"""

from kiln.inspect.anomaly import (
    AnomalyError,
    NonFiniteGuard,
    NonFiniteOutputError,
    NonFiniteReport,
    detect_anomaly,
)
from kiln.inspect.hooks import (
    backward_hooks,
    capture_activations,
    capture_gradients,
    forward_hooks,
    hook_count,
    no_inplace,
)
from kiln.inspect.plots import histogram_grid, saliency_grid
from kiln.inspect.saliency import (
    METHODS,
    default_cam_layer,
    grad_cam,
    gradient_x_input,
    saliency,
    smoothgrad,
    vanilla_gradient,
)
from kiln.inspect.stats import LayerStats, StatsReport, TensorStats, layer_stats, tensor_stats
from kiln.inspect.summary import ModelSummary, SummaryRow, count_macs, model_summary

__all__ = [
    "METHODS",
    "AnomalyError",
    "LayerStats",
    "ModelSummary",
    "NonFiniteGuard",
    "NonFiniteOutputError",
    "NonFiniteReport",
    "StatsReport",
    "SummaryRow",
    "TensorStats",
    "backward_hooks",
    "capture_activations",
    "capture_gradients",
    "count_macs",
    "default_cam_layer",
    "detect_anomaly",
    "forward_hooks",
    "grad_cam",
    "gradient_x_input",
    "histogram_grid",
    "hook_count",
    "layer_stats",
    "model_summary",
    "no_inplace",
    "saliency",
    "saliency_grid",
    "smoothgrad",
    "tensor_stats",
    "vanilla_gradient",
]

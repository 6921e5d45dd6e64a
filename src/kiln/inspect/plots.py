"""PNG figures for inspection: per-layer histograms and saliency grids.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``): no
pyplot, no global backend switch, no figure left open, so they are safe in servers, threads and
tests. matplotlib is an optional dependency (``pip install matplotlib`` or the ``all`` extra).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from kiln.inspect.stats import layer_stats
    >>> report = layer_stats(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(8, 3))
    >>> histogram_grid(report.layers, "/tmp/acts.png")  # doctest: +SKIP
    PosixPath('/tmp/acts.png')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kiln.inspect.stats import LayerStats

__all__ = ["histogram_grid", "saliency_grid", "to_image"]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the inspection PNGs need matplotlib: pip install matplotlib (or pip install "
            "'kiln[all]')"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def histogram_grid(
    layers: Sequence[LayerStats],
    path: str | Path,
    *,
    kind: Literal["activation", "gradient"] = "activation",
    columns: int = 4,
    max_panels: int = 48,
) -> Path:
    """One histogram per layer (log counts) in a grid, written as a PNG.

    Each panel is titled with the layer's name and type and notes its zero fraction and any
    NaN/Inf. Layers without statistics of this ``kind`` are left out.

    Args:
        layers: :class:`~kiln.inspect.stats.LayerStats` (from
            :func:`~kiln.inspect.stats.layer_stats`).
        path: the PNG to write (parent folders are created).
        kind: ``activation`` (module outputs) or ``gradient`` (loss gradients of them).
        columns: panels per row.
        max_panels: at most this many layers (the first ones); the title says how many were
            left out.

    Returns:
        The path written.

    Raises:
        ValueError: no layer has statistics of this kind, or a bad ``kind``.
        ImportError: matplotlib is not installed.

    Example:
        >>> histogram_grid(report.layers, "runs/x/inspect/gradients.png",
        ...                kind="gradient")  # doctest: +SKIP
    """
    if kind not in ("activation", "gradient"):
        raise ValueError(f"kind must be 'activation' or 'gradient', got {kind!r}")
    shown = [(layer, getattr(layer, kind)) for layer in layers]
    shown = [(layer, s) for layer, s in shown if s is not None and s.hist_counts]
    if not shown:
        raise ValueError(f"no layer has {kind} statistics to plot")
    left_out = max(len(shown) - max_panels, 0)
    shown = shown[:max_panels]
    cols = max(1, min(columns, len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(3.2 * cols, 2.4 * rows + 0.6)
    for i, (layer, s) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        # One step artist per panel: a bar per bin would be thousands of patches to lay out.
        color = "C0" if kind == "activation" else "C1"
        ax.stairs(s.hist_counts, s.hist_edges, fill=True, color=color)
        ax.set_yscale("log")
        note = f"zeros {s.zero_fraction:.0%}"
        if s.dead_fraction:
            note += f", dead {s.dead_fraction:.0%}"
        if s.nonfinite:
            note += f", {s.nonfinite} NaN/Inf"
        ax.set_title(f"{layer.name} ({layer.type})\n{note}", fontsize=8)
        ax.tick_params(labelsize=6)
    title = "activations (module outputs)" if kind == "activation" else "gradients of outputs"
    if left_out:
        title += f"; {left_out} more layers not shown"
    fig.suptitle(title, fontsize=10)
    # Fixed margins: tight_layout would measure every tick label of every panel (slow).
    fig.subplots_adjust(
        left=0.06,
        right=0.98,
        bottom=0.04,
        top=1 - 0.6 / fig.get_figheight(),
        hspace=0.75,
        wspace=0.3,
    )
    return _save(fig, path)


def to_image(t: torch.Tensor) -> torch.Tensor:
    """One example as something to draw: ``(H, W)`` grey or ``(H, W, 3)`` RGB in ``[0, 1]``.

    ``(1, H, W)`` and ``(H, W)`` become grey images, ``(3, H, W)`` RGB, other channel counts
    their channel mean; a vector ``(D,)`` becomes a ``(1, D)`` strip. Values are scaled to
    ``[0, 1]`` per example.

    Example:
        >>> to_image(torch.arange(6.0)).shape
        torch.Size([1, 6])
    """
    x = t.detach().float().cpu()
    if x.dim() == 1:
        x = x[None]
    elif x.dim() == 3:
        x = x.permute(1, 2, 0) if x.shape[0] == 3 else x.mean(dim=0)
    elif x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _map_image(m: torch.Tensor) -> torch.Tensor:
    """A saliency map as ``(H, W)`` in ``[0, 1]``: channels reduced by their max ``|value|``."""
    x = m.detach().float().cpu()
    if x.dim() == 3:
        x = x.abs().amax(dim=0)
    elif x.dim() == 1:
        x = x.abs()[None]
    else:
        x = x.abs()
    peak = float(x.max())
    return x / peak if peak > 0 else x


def saliency_grid(
    inputs: torch.Tensor,
    maps: torch.Tensor,
    path: str | Path,
    *,
    method: str,
    titles: Sequence[str] | None = None,
) -> Path:
    """A PNG with one row per example: the input, its saliency map, and the map over the input.

    Args:
        inputs: ``N`` examples, ``(N, C, H, W)`` images or ``(N, D)`` vectors.
        maps: their maps, shaped like ``inputs`` (gradient methods; channels are reduced by
            their largest ``|value|``) or ``(N, H, W)`` (Grad-CAM). Each map is scaled to its
            own maximum.
        path: the PNG to write (parent folders are created).
        method: the method's name, for the column title.
        titles: one label per row (``"#3 label 7, predicted 7"``).

    Returns:
        The path written.

    Raises:
        ValueError: ``inputs`` and ``maps`` differ in length, or ``titles`` does.
        ImportError: matplotlib is not installed.

    Example:
        >>> cams = grad_cam(net, x[:4])  # doctest: +SKIP
        >>> saliency_grid(x[:4], cams, "cam.png", method="gradcam")  # doctest: +SKIP
    """
    n = len(inputs)
    if len(maps) != n or (titles is not None and len(titles) != n):
        raise ValueError(
            f"got {n} inputs, {len(maps)} maps and {len(titles or [])} titles; give one each"
        )
    wide = inputs[0].dim() == 1
    fig = _figure(9.0 if not wide else 12.0, (2.6 if not wide else 1.2) * n + 0.4)
    axes: Any = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        image, heat = to_image(inputs[i]), _map_image(maps[i])
        grey = image.dim() == 2
        cells = axes[i]
        cells[0].imshow(
            image.numpy(), cmap="gray" if grey else None, aspect="auto" if wide else "equal"
        )
        cells[1].imshow(
            heat.numpy(), cmap="inferno", vmin=0, vmax=1, aspect="auto" if wide else "equal"
        )
        cells[2].imshow(
            image.numpy(), cmap="gray" if grey else None, aspect="auto" if wide else "equal"
        )
        if heat.shape == image.shape[:2]:
            cells[2].imshow(
                heat.numpy(),
                cmap="inferno",
                alpha=0.5,
                vmin=0,
                vmax=1,
                aspect="auto" if wide else "equal",
            )
        for ax in cells:
            ax.set_xticks([])
            ax.set_yticks([])
        cells[0].set_ylabel(titles[i] if titles else f"#{i}", fontsize=8)
        if i == 0:
            for ax, name in zip(cells, ("input", method, "overlay"), strict=True):
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)

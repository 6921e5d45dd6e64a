"""PNG figures: written, readable, sized by their content, and without pyplot's global state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from kiln.inspect.plots import histogram_grid, saliency_grid, to_image
from kiln.inspect.stats import layer_stats

pytest.importorskip("matplotlib")


def _no_pyplot_figures() -> list[int]:
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    return list(plt.get_fignums())


def test_histograms_of_activations_and_gradients(tmp_path: Path) -> None:
    before = ("matplotlib.pyplot" in sys.modules, _no_pyplot_figures())
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    report = layer_stats(net, torch.randn(16, 3), lambda out: out.pow(2).mean())
    acts = histogram_grid(report.layers, tmp_path / "a" / "acts.png", columns=2)
    grads = histogram_grid(report.layers, tmp_path / "grads.png", kind="gradient")
    for path in (acts, grads):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    with Image.open(acts) as a, Image.open(grads) as g:
        assert a.height > g.height  # 2 columns: two rows of panels, against one
    assert ("matplotlib.pyplot" in sys.modules, _no_pyplot_figures()) == before
    with pytest.raises(ValueError, match="kind must be"):
        histogram_grid(report.layers, tmp_path / "x.png", kind="weights")  # type: ignore[arg-type]
    forward_only = layer_stats(net, torch.randn(4, 3))
    with pytest.raises(ValueError, match="no layer has gradient statistics"):
        histogram_grid(forward_only.layers, tmp_path / "x.png", kind="gradient")


def test_saliency_grids_for_images_maps_and_vectors(tmp_path: Path) -> None:
    rgb = torch.rand(3, 3, 16, 16)
    one = saliency_grid(rgb, torch.randn(3, 3, 16, 16), tmp_path / "rgb.png", method="gradient")
    cam = saliency_grid(
        rgb[:2],
        torch.rand(2, 16, 16),
        tmp_path / "cam.png",
        method="gradcam",
        titles=["#0 label 1", "#1 label 0"],
    )
    flat = saliency_grid(
        torch.randn(2, 64), torch.randn(2, 64), tmp_path / "flat.png", method="smoothgrad"
    )
    with Image.open(one) as a, Image.open(cam) as b, Image.open(flat) as c:
        assert a.height > b.height  # one row per example
        assert min(a.width, b.width, c.width) >= 800
    with pytest.raises(ValueError, match="give one each"):
        saliency_grid(rgb, torch.rand(2, 16, 16), tmp_path / "bad.png", method="gradcam")


def test_to_image_scales_each_example_to_unit_range() -> None:
    img = to_image(torch.tensor([[[1.0, 3.0], [5.0, 9.0]]]))
    torch.testing.assert_close(img, torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert to_image(torch.rand(3, 4, 5)).shape == (4, 5, 3)
    assert to_image(torch.zeros(4)).abs().sum() == 0

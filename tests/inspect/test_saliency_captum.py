"""Our attributions equal Captum's on the same model and inputs (skipped without Captum)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.inspect.saliency import grad_cam, gradient_x_input, smoothgrad, vanilla_gradient

captum_attr = pytest.importorskip("captum.attr")


@pytest.fixture
def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    return net, torch.randn(5, 3, 10, 10), torch.tensor([0, 3, 1, 2, 3])


def test_gradient_and_gradient_x_input_match_captum(cnn: tuple) -> None:
    net, x, target = cnn
    leaf = x.clone().requires_grad_()  # Captum warns when it has to switch that on itself
    theirs = captum_attr.Saliency(net).attribute(leaf, target=target)  # abs=True by default
    torch.testing.assert_close(vanilla_gradient(net, x, target), theirs)
    signed = captum_attr.Saliency(net).attribute(leaf, target=target, abs=False)
    torch.testing.assert_close(vanilla_gradient(net, x, target, absolute=False), signed)
    ixg = captum_attr.InputXGradient(net).attribute(leaf, target=target)
    torch.testing.assert_close(gradient_x_input(net, x, target), ixg)


def test_smoothgrad_matches_noise_tunnel_with_the_same_seed(cnn: tuple) -> None:
    net, x, target = cnn
    torch.manual_seed(123)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(net)).attribute(
        x, nt_type="smoothgrad", nt_samples=6, stdevs=0.3, target=target
    )
    torch.manual_seed(123)
    ours = smoothgrad(net, x, target, samples=6, stdev=0.3)
    torch.testing.assert_close(ours, theirs)


def test_grad_cam_matches_layer_grad_cam(cnn: tuple) -> None:
    net, x, target = cnn
    for name in ("2", "3"):
        layer = net.get_submodule(name)
        theirs = captum_attr.LayerGradCam(net, layer).attribute(
            x, target=target, relu_attributions=True
        )
        ours = grad_cam(net, x, target, layer=name, upsample=False)
        torch.testing.assert_close(ours, theirs.squeeze(1))
        raw = captum_attr.LayerGradCam(net, layer).attribute(x, target=target)
        torch.testing.assert_close(
            grad_cam(net, x, target, layer=name, upsample=False, relu=False), raw.squeeze(1)
        )
    upsampled = captum_attr.LayerAttribution.interpolate(theirs, (10, 10), "bilinear")
    torch.testing.assert_close(grad_cam(net, x, target, layer="3"), upsampled.squeeze(1))

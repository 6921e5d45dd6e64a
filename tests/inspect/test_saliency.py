"""Saliency maps: analytic checks on linear models, Grad-CAM finds a planted feature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.inspect.hooks import hook_count
from kiln.inspect.saliency import (
    default_cam_layer,
    grad_cam,
    gradient_x_input,
    resolve_targets,
    saliency,
    smoothgrad,
    vanilla_gradient,
)
from kiln.models import MLP, ResNet


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def test_gradient_of_a_linear_model_is_its_weight_row(linear: nn.Linear) -> None:
    x = torch.randn(4, 6)
    w = linear.weight.detach()
    target = torch.tensor([0, 2, 1, 2])
    grad = vanilla_gradient(linear, x, target, absolute=False)
    torch.testing.assert_close(grad, w[target])
    torch.testing.assert_close(vanilla_gradient(linear, x, target), w[target].abs())
    torch.testing.assert_close(gradient_x_input(linear, x, target), x * w[target])
    # gradient x input sums to the score minus the bias (completeness of a linear score)
    score = linear(x).gather(1, target[:, None]).squeeze(1) - linear.bias[target]
    torch.testing.assert_close(gradient_x_input(linear, x, target).sum(1), score.detach())
    assert linear.weight.grad is None  # the parameters' gradients are untouched


def test_smoothgrad_of_a_linear_model_is_its_weight_row(linear: nn.Linear) -> None:
    x = torch.randn(3, 6)
    g = torch.Generator().manual_seed(0)
    sg = smoothgrad(linear, x, 1, samples=7, stdev=2.0, absolute=False, generator=g)
    torch.testing.assert_close(sg, linear.weight.detach()[1].expand(3, 6))


def test_smoothgrad_averages_the_gradient_over_the_noisy_copies() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    sg = smoothgrad(net, x, 0, samples=5, stdev=0.5, generator=torch.Generator().manual_seed(3))
    noise = torch.randn((10, 4), generator=torch.Generator().manual_seed(3)) * 0.5
    copies = x.repeat_interleave(5, dim=0) + noise
    expected = vanilla_gradient(net, copies, 0).view(2, 5, 4).mean(1)
    torch.testing.assert_close(sg, expected)
    chunked = smoothgrad(
        net, x, 0, samples=5, stdev=0.5, generator=torch.Generator().manual_seed(3), batch_size=3
    )
    torch.testing.assert_close(chunked, expected)


def test_targets_default_to_the_predicted_class() -> None:
    out = torch.tensor([[0.1, 2.0], [3.0, 0.0]])
    assert resolve_targets(out, None).tolist() == [1, 0]
    assert resolve_targets(out, 1).tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        resolve_targets(out, 2)
    with pytest.raises(ValueError, match="one score per example"):
        resolve_targets(torch.zeros(2, 3, 4), None)


def _planted(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """12x12 noise images; class 1 holds a bright 3x3 patch at a random place, class 0 none."""
    x = 0.3 * torch.randn(n, 1, 12, 12, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    where = []
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, 10, (2,), generator=generator))
        if y[i] == 1:
            x[i, 0, r : r + 3, c : c + 3] += 2.0
        where.append((r, c))
    return x, y, where


def test_grad_cam_highlights_a_planted_patch() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(120):
        xb, yb, _ = _planted(64, g)
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y, where = _planted(64, g)
    assert (net(x).argmax(1) == y).float().mean() > 0.9  # it learned the task
    assert default_cam_layer(net, x) == "2"
    cam = grad_cam(net, x, target=1)  # the default layer: the last conv
    assert cam.shape == (64, 12, 12)  # the input's spatial size
    hits = 0
    positives = [i for i in range(64) if y[i] == 1]
    for i in positives:
        r, c = where[i]
        peak = int(cam[i].argmax())
        pr, pc = divmod(peak, 12)
        hits += r - 1 <= pr <= r + 3 and c - 1 <= pc <= c + 3  # within a pixel of the patch
    assert hits / len(positives) > 0.9
    assert hook_count(net) == 0


def test_grad_cam_default_layer_of_a_resnet_is_its_last_block() -> None:
    net = ResNet(num_classes=3, in_channels=1, depths=(1, 1), width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    assert default_cam_layer(net, x) == "stages.1.0"
    cam = grad_cam(net, x)
    assert cam.shape == (2, 8, 8) and bool((cam >= 0).all())
    assert grad_cam(net, x, layer="stages.1.0", upsample=False).shape == (2, 4, 4)


def test_grad_cam_errors_name_the_problem() -> None:
    mlp = MLP(in_features=64, out_features=10, hidden=(16,))
    with pytest.raises(ValueError, match="needs a convolutional layer and MLP has none"):
        grad_cam(mlp, torch.randn(2, 1, 8, 8))
    net = ResNet(num_classes=3, in_channels=1, depths=(1,), width=4).eval()
    with pytest.raises(ValueError, match="'fc' gives \\[2, 3\\]"):
        grad_cam(net, torch.randn(2, 1, 8, 8), layer="fc")
    with pytest.raises(ValueError, match="did you mean"):
        grad_cam(net, torch.randn(2, 1, 8, 8), layer="stages.0.O")
    with pytest.raises(ValueError, match="allowed: gradient, grad_x_input, smoothgrad, gradcam"):
        saliency(net, torch.randn(2, 1, 8, 8), "lime")
    with pytest.raises(ValueError, match="float input"):
        vanilla_gradient(nn.Embedding(5, 2), torch.tensor([[1, 2]]))
    assert hook_count(net) == 0

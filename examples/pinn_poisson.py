"""A physics-informed neural network (PINN) for the 1-D Poisson equation, in plain PyTorch.

Problem: ``u''(x) = -pi^2 sin(pi x)`` on ``[0, 1]`` with ``u(0) = u(1) = 0``; the solution is
``u(x) = sin(pi x)``. The network ``u_theta(x)`` is trained without any solution values: the loss
is the mean squared residual ``u_theta''(x) + pi^2 sin(pi x)`` at collocation points plus the
squared boundary values. The second derivative comes from ``torch.autograd.grad`` twice with
``create_graph=True``, so the residual stays differentiable with respect to the weights (the
optimizer differentiates a loss that already contains derivatives: a higher-order gradient).

Training is Adam (robust from a random start) then L-BFGS (fast, precise convergence on this
smooth, small problem), in float64 with a small tanh MLP (smooth, so ``u''`` is informative;
ReLU would have ``u'' = 0`` almost everywhere).

Run: python examples/pinn_poisson.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PinnResult:
    """What :func:`main` returns.

    Attributes:
        model: the trained network ``x -> u(x)``, inputs of shape ``(n, 1)``.
        max_error: ``max |u_theta(x) - sin(pi x)|`` on 1001 evenly spaced points of ``[0, 1]``.
        final_loss: residual plus boundary loss after training.
    """

    model: nn.Module
    max_error: float
    final_loss: float


def second_derivative(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``d^2 u / dx^2`` at ``x`` (shape ``(n, 1)``), differentiable with respect to the weights.

    Each point's output depends only on its own input, so the gradient of ``u.sum()`` with
    respect to ``x`` is the per-point derivative.

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> second_derivative(net, torch.rand(5, 1, dtype=torch.float64)).shape
        torch.Size([5, 1])
    """
    x = x.detach().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    return d2u


def pinn_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean squared PDE residual at ``x`` plus the squared boundary values at 0 and 1.

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> float(pinn_loss(net, torch.rand(16, 1, dtype=torch.float64))) > 0
        True
    """
    residual = second_derivative(model, x) + math.pi**2 * torch.sin(math.pi * x)
    ends = torch.tensor([[0.0], [1.0]], dtype=x.dtype, device=x.device)
    return residual.pow(2).mean() + model(ends).pow(2).mean()


def main(
    *,
    hidden: int = 20,
    points: int = 64,
    adam_steps: int = 500,
    adam_lr: float = 1e-2,
    lbfgs_steps: int = 200,
    seed: int = 0,
    verbose: bool = True,
) -> PinnResult:
    """Train the PINN and report its largest error against ``sin(pi x)``.

    Args:
        hidden: width of the two tanh hidden layers.
        points: collocation points (evenly spaced in ``(0, 1)``, fixed).
        adam_steps: Adam updates before L-BFGS.
        adam_lr: Adam's learning rate.
        lbfgs_steps: L-BFGS iterations (strong-Wolfe line search).
        seed: seeds the initial weights.
        verbose: print the loss after each phase and the error.

    Returns:
        The trained model, its max error on ``[0, 1]`` and the final loss.

    Example:
        >>> result = main(verbose=False)                          # doctest: +SKIP
        >>> result.max_error < 1e-2                               # doctest: +SKIP
        True
    """
    torch.manual_seed(seed)
    dtype = torch.float64  # second derivatives of a float32 net lose most of their digits
    model = nn.Sequential(
        nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    ).to(dtype)
    x = torch.linspace(0, 1, points + 2, dtype=dtype)[1:-1].unsqueeze(1)  # interior points

    adam = torch.optim.Adam(model.parameters(), lr=adam_lr)
    for _ in range(adam_steps):
        loss = pinn_loss(model, x)
        loss.backward()
        adam.step()
        adam.zero_grad(set_to_none=True)
    if verbose:
        print(f"after {adam_steps} Adam steps: loss {pinn_loss(model, x).item():.3e}")

    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=lbfgs_steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad(set_to_none=True)
        loss = pinn_loss(model, x)
        loss.backward()
        return loss

    lbfgs.step(closure)
    final = pinn_loss(model, x).item()

    grid = torch.linspace(0, 1, 1001, dtype=dtype).unsqueeze(1)
    with torch.no_grad():
        error = (model(grid) - torch.sin(math.pi * grid)).abs().max().item()
    if verbose:
        print(f"after L-BFGS ({lbfgs_steps} iterations max): loss {final:.3e}")
        print(f"max |u - sin(pi x)| on [0, 1]: {error:.2e}")
    return PinnResult(model=model, max_error=error, final_loss=final)


if __name__ == "__main__":
    main()

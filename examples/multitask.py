"""Multi-task learning with learned uncertainty weights, in a plain PyTorch loop.

A shared trunk with two heads learns two tasks on scikit-learn's digits at once: the digit
(10 classes) and a deliberately noisy second task, the digit's parity with 30% of its training
labels flipped. ``kiln.losses.MultiTaskLoss`` learns one log-variance per task (Kendall et al.
2018) and so down-weights the noisy task by itself; the printed task weights show it.

Run:  python examples/multitask.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from kiln.losses import MultiTaskLoss


class TwoHeads(nn.Module):
    """Shared trunk, one head per task; returns a dict of outputs by task name."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.digit = nn.Linear(width, 10)
        self.parity = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"digit": self.digit(h), "parity": self.parity(h)}


def main(steps: int = 300, noise: float = 0.3, seed: int = 0) -> dict[str, float]:
    """Train, print test accuracies and the learned task weights, and return them."""
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]
    parity = y % 2
    noisy = parity.clone()
    flip = torch.rand(len(y)) < noise  # noisy labels for training only
    noisy[flip] = 1 - noisy[flip]

    model = TwoHeads()
    mtl = MultiTaskLoss(["digit", "parity"])
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters(), "weight_decay": 0.01},
            {"params": mtl.parameters(), "weight_decay": 0.0},  # decay would pull s_i to 0
        ],
        lr=3e-3,
    )
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,))]
        out = model(x[idx])
        losses = {
            "digit": F.cross_entropy(out["digit"], y[idx]),
            "parity": F.cross_entropy(out["parity"], noisy[idx]),
        }
        loss = mtl(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.inference_mode():
        out = model(x[test])
        acc = (out["digit"].argmax(-1) == y[test]).float().mean().item()
        par = (out["parity"].argmax(-1) == parity[test]).float().mean().item()
    w = mtl.task_weights().tolist()
    print(f"after {steps} steps: digit accuracy {acc:.3f}, parity accuracy {par:.3f}")
    print(f"learned task weights: digit {w[0]:.2f}, parity {w[1]:.2f} (noisy task down-weighted)")
    return {"digit_acc": acc, "parity_acc": par, "w_digit": w[0], "w_parity": w[1]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    main(ap.parse_args().steps)

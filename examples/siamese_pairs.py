"""A Siamese network on pairs of digits, trained with Kiln's contrastive loss in a plain loop.

Run: python examples/siamese_pairs.py
One shared MLP embeds both images of a pair; the contrastive loss pulls same-digit pairs together
and pushes different-digit pairs at least ``margin`` apart. Pair losses are library functions, not
``loss.name`` values: the supervised trainer yields (image, label) batches, and pairs are made here.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from kiln.losses import contrastive_loss

MARGIN = 1.0


def sample_pairs(
    labels: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` index pairs into ``labels``, half same-class (target 1), half different (target 0)."""
    order = torch.argsort(labels)  # indices grouped by class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    first = torch.randint(len(labels), (n,), generator=generator)
    same = torch.arange(n) % 2 == 0
    shift = torch.randint(1, len(counts), (n,), generator=generator)
    cls = torch.where(same, labels[first], (labels[first] + shift) % len(counts))
    offset = (torch.rand(n, generator=generator) * counts[cls]).long()
    return first, order[starts[cls] + offset], same.long()


def main(steps: int = 400, seed: int = 0) -> dict[str, float]:
    """Train for ``steps`` updates; return held-out pair and nearest-neighbour accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=g)
    x_train, y_train, x_test, y_test = (
        x[perm[:1400]],
        y[perm[:1400]],
        x[perm[1400:]],
        y[perm[1400:]],
    )

    encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    for step in range(steps):
        i, j, same = sample_pairs(y_train, 128, g)
        # One forward pass for both sides of every pair: the two towers share their weights.
        left, right = encoder(x_train[torch.cat([i, j])]).chunk(2)
        loss = contrastive_loss(left, right, same, margin=MARGIN)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: contrastive loss {loss.item():.4f}")

    encoder.eval()
    with torch.inference_mode():
        i, j, same = sample_pairs(y_test, 2000, g)
        d = torch.pairwise_distance(encoder(x_test[i]), encoder(x_test[j]))
        pair_acc = ((d < MARGIN / 2) == same.bool()).float().mean().item()
        nearest = torch.cdist(encoder(x_test), encoder(x_train)).argmin(1)
        knn_acc = (y_train[nearest] == y_test).float().mean().item()
    print(f"held-out pair accuracy {pair_acc:.3f}, 1-NN digit accuracy {knn_acc:.3f}")
    return {"pair_accuracy": pair_acc, "knn_accuracy": knn_acc}


if __name__ == "__main__":
    main()

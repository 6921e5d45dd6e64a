"""Node classification with a two-layer graph convolutional network (PyTorch Geometric).

The graph is generated here: a stochastic block model, where nodes of the same class link with
probability ``p_in`` and nodes of different classes with a much smaller ``p_out``, and each node
carries noisy features whose mean depends on its class. The features alone are too noisy to
classify well; a GCN (Kipf and Welling 2017) averages each node's features with its neighbours',
who mostly share its class, and cleans the signal up. The script trains the same GCN twice, on
the graph and on the graph without edges (each node sees only itself), to show what the edges
add.

Needs the optional ``torch_geometric`` package (``pip install torch_geometric``).

Run: python examples/gnn_nodes.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GraphData:
    """A generated graph: features, undirected edges, labels and the split masks."""

    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor


@dataclass
class GnnResult:
    """What :func:`main` returns: test accuracies with and without the edges, and the chance."""

    test_acc: float
    no_edges_test_acc: float
    chance: float
    num_edges: int


def make_sbm_graph(
    *,
    nodes_per_class: int = 100,
    classes: int = 4,
    p_in: float = 0.05,
    p_out: float = 0.005,
    features: int = 16,
    noise: float = 2.0,
    train_per_class: int = 20,
    val_per_class: int = 20,
    generator: torch.Generator,
) -> GraphData:
    """A stochastic-block-model graph with class-dependent Gaussian features.

    Each class has a random unit-scale mean vector; a node's features are its class mean plus
    ``noise`` times standard normal noise. Training and validation nodes are the first
    ``train_per_class`` and next ``val_per_class`` nodes of each class in a random order; the
    rest are test nodes.

    Example:
        >>> g = make_sbm_graph(nodes_per_class=10, classes=2, generator=torch.Generator())
        >>> g.x.shape, int(g.test_mask.sum())
        (torch.Size([20, 16]), 0)
    """
    n = nodes_per_class * classes
    y = torch.arange(classes).repeat_interleave(nodes_per_class)
    # One Bernoulli draw per unordered pair (upper triangle), mirrored: an undirected graph.
    prob = torch.where(y[:, None] == y[None, :], p_in, p_out)
    upper = torch.triu(torch.bernoulli(prob, generator=generator), diagonal=1).bool()
    src, dst = upper.nonzero(as_tuple=True)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)

    means = torch.randn(classes, features, generator=generator)
    x = means[y] + noise * torch.randn(n, features, generator=generator)

    train_mask = torch.zeros(n, dtype=torch.bool)
    val_mask = torch.zeros(n, dtype=torch.bool)
    for c in range(classes):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        train_mask[members[:train_per_class]] = True
        val_mask[members[train_per_class : train_per_class + val_per_class]] = True
    test_mask = ~(train_mask | val_mask)
    return GraphData(x, edge_index, y, train_mask, val_mask, test_mask)


class GCN(nn.Module):
    """Two graph convolutions: ``GCNConv -> ReLU -> dropout -> GCNConv`` (Kipf and Welling).

    Example:
        >>> net = GCN(16, 32, 4)
        >>> edges = torch.tensor([[0, 1], [1, 0]])
        >>> net(torch.randn(3, 16), edges).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_features: int, hidden: int, classes: int, dropout: float = 0.5):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(in_features, hidden)
        self.conv2 = GCNConv(hidden, classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Class logits ``(nodes, classes)``."""
        h = F.relu(self.conv1(x, edge_index))
        h = F.dropout(h, p=self.dropout, training=self.training)
        return self.conv2(h, edge_index)


def train_gcn(
    graph: GraphData,
    edge_index: torch.Tensor,
    *,
    hidden: int = 32,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> float:
    """Train a :class:`GCN` full-batch on the training nodes; test accuracy at the best val.

    Example:
        >>> g = make_sbm_graph(generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> train_gcn(g, g.edge_index) > 0.8                                # doctest: +SKIP
        True
    """
    torch.manual_seed(seed)  # initial weights and dropout masks
    classes = int(graph.y.max()) + 1
    model = GCN(graph.x.shape[1], hidden, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_val, test_at_best = -1.0, 0.0
    for _ in range(epochs):
        model.train()
        logits = model(graph.x, edge_index)
        loss = F.cross_entropy(logits[graph.train_mask], graph.y[graph.train_mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        model.eval()
        with torch.no_grad():
            pred = model(graph.x, edge_index).argmax(dim=1)
        correct = pred == graph.y
        val = correct[graph.val_mask].float().mean().item()
        if val > best_val:
            best_val, test_at_best = val, correct[graph.test_mask].float().mean().item()
    return test_at_best


def main(
    *,
    seed: int = 0,
    epochs: int = 200,
    nodes_per_class: int = 100,
    classes: int = 4,
    p_in: float = 0.05,
    p_out: float = 0.005,
    noise: float = 2.0,
    verbose: bool = True,
) -> GnnResult:
    """Generate the graph, train the GCN with and without edges, report test accuracy.

    Args:
        seed: seeds the graph, the split and the weights.
        epochs: full-batch training epochs.
        nodes_per_class: nodes in each block of the stochastic block model.
        classes: blocks (classes).
        p_in: edge probability inside a class.
        p_out: edge probability across classes.
        noise: standard deviation of the feature noise around each class mean.
        verbose: print the graph size and both accuracies.

    Returns:
        Test accuracies on the graph and without edges, and the chance level.

    Example:
        >>> result = main(verbose=False)                  # doctest: +SKIP
        >>> result.test_acc > result.no_edges_test_acc    # doctest: +SKIP
        True
    """
    graph = make_sbm_graph(
        nodes_per_class=nodes_per_class,
        classes=classes,
        p_in=p_in,
        p_out=p_out,
        noise=noise,
        generator=torch.Generator().manual_seed(seed),
    )
    acc = train_gcn(graph, graph.edge_index, epochs=epochs, seed=seed)
    no_edges = torch.empty(2, 0, dtype=torch.long)
    acc_alone = train_gcn(graph, no_edges, epochs=epochs, seed=seed)
    result = GnnResult(acc, acc_alone, 1.0 / classes, graph.edge_index.shape[1] // 2)
    if verbose:
        print(
            f"graph: {graph.x.shape[0]} nodes, {result.num_edges} edges, {classes} classes, "
            f"{int(graph.train_mask.sum())} labelled"
        )
        print(
            f"GCN test accuracy {acc:.3f} "
            f"(without edges {acc_alone:.3f}, chance {result.chance:.3f})"
        )
    return result


if __name__ == "__main__":
    main()

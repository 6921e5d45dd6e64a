"""Custom modules: Swish's learnable beta, buffers vs parameters (RunningStandardize), the
Siamese network's shared weights, and parameter counts with tied and shared weights."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.models import GPT, ResNet
from kiln.models.blocks import RunningStandardize, Swish
from kiln.models.siamese import Siamese, pair_distance
from kiln.models.summary import count_parameters

# --- Swish ------------------------------------------------------------------------------------


def test_swish_with_beta_one_is_silu() -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(Swish()(x), F.silu(x))
    torch.testing.assert_close(Swish(0.0)(x), x / 2)
    torch.testing.assert_close(Swish(50.0)(x), torch.relu(x), atol=0.01, rtol=0)


def test_swish_beta_gradient_matches_the_derivative() -> None:
    torch.manual_seed(0)
    act = Swish(0.7).double()
    x = torch.randn(64, dtype=torch.float64)
    upstream = torch.randn(64, dtype=torch.float64)
    (act(x) * upstream).sum().backward()
    s = torch.sigmoid(0.7 * x)
    expected = (upstream * x.square() * s * (1 - s)).sum()  # d/dbeta x*sigmoid(beta*x)
    assert act.beta.grad is not None
    torch.testing.assert_close(act.beta.grad, expected)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: a * torch.sigmoid(b * a), (xs, beta))


def test_swish_beta_is_trained_or_fixed() -> None:
    torch.manual_seed(0)
    learnable, fixed = Swish(), Swish(learnable=False)
    assert [n for n, _ in learnable.named_parameters()] == ["beta"]
    assert list(fixed.parameters()) == [] and "beta" in fixed.state_dict()
    opt = torch.optim.SGD(learnable.parameters(), lr=0.5)
    x = torch.randn(32)
    learnable(x).square().mean().backward()
    opt.step()
    assert learnable.beta.item() != 1.0
    assert fixed(x).requires_grad is False
    with pytest.raises(ValueError, match="finite number"):
        Swish(float("inf"))


# --- buffers vs parameters ----------------------------------------------------------------


def test_running_statistics_are_exact_over_uneven_batches() -> None:
    torch.manual_seed(0)
    data = torch.randn(71, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 1000.0
    norm = RunningStandardize(3).double()
    for batch in data.split([7, 1, 50, 13]):
        norm(batch)
    torch.testing.assert_close(norm.running_mean, data.mean(0))
    torch.testing.assert_close(norm.running_var, data.var(0, unbiased=False))
    assert norm.count.item() == 71
    torch.testing.assert_close(norm.last_mean, data[-13:].mean(0))


def test_momentum_is_an_exponential_moving_average() -> None:
    torch.manual_seed(0)
    norm = RunningStandardize(2, momentum=0.25)
    batches = [torch.randn(16, 2) + i for i in range(3)]
    mean, var = batches[0].mean(0), batches[0].var(0, unbiased=False)
    for b in batches[1:]:
        mean = 0.75 * mean + 0.25 * b.mean(0)
        var = 0.75 * var + 0.25 * b.var(0, unbiased=False)
    for b in batches:
        norm(b)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)


def test_output_uses_the_running_statistics_and_eval_freezes_them() -> None:
    torch.manual_seed(0)
    data = torch.randn(256, 4) * 3 + 2
    norm = RunningStandardize(4, eps=1e-5)
    norm(data)
    norm.eval()
    before = norm.running_mean.clone()
    x = torch.randn(5, 7, 4)  # any leading dims
    out = norm(x)
    expected = (x - data.mean(0)) / torch.sqrt(data.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, expected)
    assert torch.equal(norm.running_mean, before) and norm.count.item() == 256
    standardised = norm(data)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        standardised.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="last dimension 3"):
        norm(torch.randn(2, 3))


def test_buffers_are_saved_but_non_persistent_ones_are_not() -> None:
    torch.manual_seed(0)
    norm = RunningStandardize(3)
    norm(torch.randn(20, 3) * 4)
    state = norm.state_dict()
    assert set(state) == {"running_mean", "running_var", "count"}
    assert {n for n, _ in norm.named_buffers()} == {*state, "last_mean"}
    fresh = RunningStandardize(3).eval()
    fresh.load_state_dict(state)
    x = torch.randn(6, 3)
    torch.testing.assert_close(fresh(x), norm.eval()(x))


def test_buffers_are_moved_and_cast_by_to() -> None:
    norm = RunningStandardize(3, affine=True).double()
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float64
    assert norm.last_mean.dtype == torch.float64  # non-persistent buffers move too
    assert norm.weight is not None and norm.weight.dtype == torch.float64
    assert norm.count.dtype == torch.int64  # .double() casts floating point state only
    out = norm(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    half = RunningStandardize(3).to(torch.bfloat16)
    assert half.running_var.dtype == torch.bfloat16


def test_buffers_are_not_parameters_and_no_optimizer_trains_them() -> None:
    torch.manual_seed(0)
    norm = RunningStandardize(3, affine=True)
    net = nn.Sequential(norm, nn.Linear(3, 1))
    net[0](torch.randn(64, 3) + 5)  # gather statistics once, then freeze them
    net.eval()
    params = {id(p) for p in net.parameters()}
    for b in net.buffers():
        assert id(b) not in params and not b.requires_grad
    assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    weight = norm.weight.detach().clone()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(net(torch.randn(16, 3) + 5), torch.ones(16, 1)).backward()
        opt.step()
    assert not torch.equal(norm.weight, weight)  # the parameters trained
    for name, b in net.named_buffers():
        assert torch.equal(b, buffers[name]), name  # the buffers did not
        assert b.grad is None
    assert all(id(p) in params for g in opt.param_groups for p in g["params"])


# --- Siamese ------------------------------------------------------------------------------


def _tower() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _contrastive(d: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    return (same * d.square() + (1 - same) * torch.relu(margin - d).square()).mean() / 2


def test_siamese_has_the_parameters_of_one_tower() -> None:
    tower = _tower()
    net = Siamese(tower)
    tower_params = list(tower.parameters())
    assert [id(p) for p in net.parameters()] == [id(p) for p in tower_params]
    assert count_parameters(net).total == count_parameters(tower).total == 6 * 16 + 16 + 16 * 4 + 4
    assert count_parameters(net, depth=2).row("tower.0").total == 6 * 16 + 16


def test_both_branches_add_their_gradient_to_the_shared_weights() -> None:
    torch.manual_seed(0)
    net = Siamese(_tower())
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    same = torch.tensor([1.0, 0.0] * 4)
    _contrastive(net.distance(*net(x1, x2)), same).backward()

    # Reference: two separate copies of the tower, one per branch, the same loss.
    left, right = copy.deepcopy(net.tower), copy.deepcopy(net.tower)
    for p in (*left.parameters(), *right.parameters()):
        p.grad = None
    _contrastive(pair_distance(left(x1), right(x2)), same).backward()
    for shared, g1, g2 in zip(
        net.tower.parameters(), left.parameters(), right.parameters(), strict=True
    ):
        assert g1.grad is not None and g2.grad is not None
        assert g1.grad.abs().sum() > 0 and g2.grad.abs().sum() > 0  # both branches contribute
        torch.testing.assert_close(shared.grad, g1.grad + g2.grad)


def test_each_branch_runs_alone_so_batchnorm_sees_one_branch() -> None:
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    net = Siamese(copy.deepcopy(tower))
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6) * 3 + 1
    z1, z2 = net(x1, x2)
    torch.testing.assert_close(z1, tower(x1))
    torch.testing.assert_close(z2, tower(x2))


def test_embeddings_and_distances() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2))  # (N, 2, 2, 2) -> (N, 8)
    x1, x2 = torch.randn(3, 1, 6, 6), torch.randn(3, 1, 6, 6)
    net = Siamese(conv)
    z1, z2 = net(x1, x2)
    assert z1.shape == (3, 8)
    torch.testing.assert_close(net.distance(z1, z2), (z1 - z2).norm(dim=1), atol=1e-5, rtol=0)
    unit = Siamese(conv, metric="cosine", normalize=True)
    u1, u2 = unit(x1, x2)
    torch.testing.assert_close(u1.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(unit.distance(u1, u2), 1 - (u1 * u2).sum(1))
    # Unit vectors: squared Euclidean distance is twice the cosine distance.
    torch.testing.assert_close(
        pair_distance(u1, u2).square(), 2 * pair_distance(u1, u2, "cosine"), atol=1e-4, rtol=0
    )


def test_embeddings_work_with_torch_metric_losses() -> None:
    torch.manual_seed(0)
    net = Siamese(_tower())
    a, p, n = (torch.randn(4, 6) for _ in range(3))
    z1, z2 = net(a, p)
    nn.CosineEmbeddingLoss()(z1, z2, torch.tensor([1, -1, 1, -1])).backward()
    nn.TripletMarginLoss()(net.embed(a), net.embed(p), net.embed(n)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    x = torch.randn(2, 6)  # identical inputs: distance ~0 and a finite gradient
    net.zero_grad()
    net.distance(*net(x, x)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_siamese_errors() -> None:
    with pytest.raises(ValueError, match="allowed: euclidean, cosine"):
        Siamese(_tower(), metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module tower"):
        Siamese(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings"):
        Siamese(nn.Flatten(0))(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        pair_distance(torch.randn(2, 3), torch.randn(3, 3))


# --- count_parameters ---------------------------------------------------------------------


def test_resnet_counts_per_top_level_module() -> None:
    net = ResNet(num_classes=2, in_channels=1, depths=(1,), width=4)
    counts = count_parameters(net)
    # stem: conv 1*4*9 + BN 2*4; block: 2 x (conv 4*4*9 + BN 2*4); fc: 4*2 + 2.
    assert [(r.name, r.type, r.total) for r in counts.rows] == [
        ("stem", "Sequential", 44),
        ("stages", "Sequential", 304),
        ("pool", "Sequential", 0),
        ("drop", "Identity", 0),
        ("fc", "Linear", 10),
    ]
    assert counts.total == counts.trainable == 358 == sum(p.numel() for p in net.parameters())
    assert counts.frozen == 0
    assert counts.buffers == 3 * (4 + 4 + 1)  # BN running mean, var, num_batches_tracked
    for p in net.stem.parameters():
        p.requires_grad_(False)
    frozen = count_parameters(net)
    assert (frozen.total, frozen.trainable, frozen.frozen) == (358, 314, 44)
    assert frozen.row("stem").frozen == 44 and frozen.row("fc").frozen == 0


def test_deeper_rows_and_leaves_shallower_than_the_depth() -> None:
    net = ResNet(num_classes=2, in_channels=1, depths=(1, 1), width=4)
    counts = count_parameters(net, depth=2)
    assert [r.name for r in counts.rows] == [
        "stem.0",
        "stem.1",
        "stem.2",
        "stages.0",
        "stages.1",
        "pool.0",
        "pool.1",
        "drop",  # leaves above depth 2 keep a row of their own
        "fc",
    ]
    for stage in ("stages.0", "stages.1"):
        expected = sum(p.numel() for p in net.get_submodule(stage).parameters())
        assert counts.row(stage).total == expected
    assert sum(r.total for r in counts.rows) == counts.total == count_parameters(net).total


def test_gpt_tied_head_is_counted_once() -> None:
    vocab, dim = 50, 16
    gpt = GPT(vocab_size=vocab, block_size=8, n_layer=2, n_head=2, n_embd=dim)
    counts = count_parameters(gpt)
    naive = sum(p.numel() for _, p in gpt.named_parameters(remove_duplicate=False))
    assert counts.total == naive - vocab * dim == sum(p.numel() for p in gpt.parameters())
    head = counts.row("lm_head")
    assert (head.total, head.shared) == (0, vocab * dim)
    assert counts.row("tok_emb").total == vocab * dim
    assert sum(r.total for r in counts.rows) == counts.total
    deep = count_parameters(gpt, depth=2)
    per_block = sum(p.numel() for p in gpt.blocks[0].parameters())
    assert deep.row("blocks.0").total == deep.row("blocks.1").total == per_block


def test_a_module_registered_twice_and_own_parameters() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            shared = nn.Linear(3, 3)
            self.left, self.right = shared, shared

    counts = count_parameters(Twice())
    assert counts.total == 3 + 12
    assert [(r.name, r.total, r.shared) for r in counts.rows] == [
        ("", 3, 0),
        ("left", 12, 0),
        ("right", 0, 12),
    ]


def test_table_and_dict() -> None:
    gpt = GPT(vocab_size=500, block_size=8, n_layer=1, n_head=2, n_embd=32)
    counts = count_parameters(gpt)
    table = str(counts)
    assert re.search(r"^lm_head\s+Linear\s+0\s+0\s+16,000$", table, flags=re.M), table
    assert re.search(rf"^total\s+{counts.total:,}\s+{counts.total:,}$", table, flags=re.M)
    assert table.splitlines()[-1] == f"trainable {counts.total:,} | frozen 0 | buffers 0"
    data = json.loads(json.dumps(counts.to_dict()))
    assert data["total"] == counts.total and data["rows"][-1]["shared"] == 16_000


def test_count_parameters_errors() -> None:
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        count_parameters(nn.Linear(2, 2), depth=0)
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        count_parameters([nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="rows: '0', '1'"):
        count_parameters(nn.Sequential(nn.Linear(2, 2), nn.ReLU())).row("fc")

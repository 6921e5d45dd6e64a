"""DropPath (stochastic depth): the per-sample rule, eval identity, the global RNG, the linear
rate rule, and how ResNet and GPT apply it per residual branch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kiln.data.base import DataInfo
from kiln.models import GPT, BasicBlock, ResNet, build_gpt, build_resnet
from kiln.models.gpt import TransformerBlock
from kiln.models.layers import DropPath, drop_path, drop_path_rates


def test_drops_whole_samples_at_the_rate_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    rate, n = 0.3, 20_000
    x = torch.randn(1, 3, 4).expand(n, 3, 4)
    out = drop_path(x, rate)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = ~dropped
    # Per sample: either the whole sample is zero or the whole sample is x / keep.
    torch.testing.assert_close(out[kept], x[kept] / (1 - rate))
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.015)  # ~5 sigma
    torch.testing.assert_close(out.mean(dim=0), x[0], rtol=0.03, atol=0.01)


def test_identity_in_eval_mode_and_at_rate_zero() -> None:
    x = torch.randn(64, 5)
    module = DropPath(0.5)
    assert torch.equal(module.eval()(x), x)
    assert not torch.equal(module.train()(x), x)
    assert torch.equal(DropPath(0.0)(x), x)
    assert torch.equal(drop_path(x, 0.5, training=False), x)


def test_uses_the_global_rng_so_saved_rng_state_resumes_it() -> None:
    x = torch.randn(256, 4)
    torch.manual_seed(3)
    first = drop_path(x, 0.5)
    state = torch.get_rng_state()
    second = drop_path(x, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(drop_path(x, 0.5), second)  # resumed exactly from the saved state
    torch.manual_seed(3)
    assert torch.equal(drop_path(x, 0.5), first)
    assert not torch.equal(first, second)  # consecutive calls draw new masks


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True])
def test_bad_rates_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"drop_path rate must be a float in \[0, 1\)"):
        DropPath(bad)
    with pytest.raises(ValueError, match="drop_path rate"):
        drop_path_rates(bad, 3)


def test_linear_rule_over_blocks() -> None:
    rates = drop_path_rates(0.2, 5)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 5))
    assert rates[0] == 0.0 and rates[-1] == 0.2
    assert drop_path_rates(0.3, 2) == [0.0, 0.3]
    assert drop_path_rates(0.3, 1) == [0.0]
    assert drop_path_rates(0.0, 4) == [0.0] * 4
    with pytest.raises(ValueError, match="n_blocks"):
        drop_path_rates(0.1, 0)


def test_resnet_and_gpt_spread_the_rate_linearly_over_their_blocks() -> None:
    net = ResNet(num_classes=3, in_channels=1, depths=(2, 1, 2), width=4, drop_path=0.4)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert [b.drop_path.rate for b in blocks] == pytest.approx(drop_path_rates(0.4, 5))
    gpt = GPT(vocab_size=7, block_size=4, n_layer=3, n_head=1, n_embd=8, drop_path=0.2)
    assert [b.drop_path1.rate for b in gpt.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path2.rate for b in gpt.blocks] == pytest.approx([0.0, 0.1, 0.2])
    image = DataInfo("classification", (1, 8, 8), num_classes=3)
    built = build_resnet(image, depths=(1, 1), width=4, drop_path=0.1)
    assert [b.drop_path.rate for b in built.modules() if isinstance(b, BasicBlock)] == [0.0, 0.1]
    lm = build_gpt(DataInfo("lm", (4,), vocab_size=7), n_layer=2, n_embd=8, drop_path=0.1)
    assert lm.blocks[1].drop_path1.rate == pytest.approx(0.1)


def test_basic_block_drops_its_branch_per_sample() -> None:
    # Reference: relu(mask * branch(x) / keep + x) with the mask the global RNG would draw.
    torch.manual_seed(0)
    rate = 0.5
    block = BasicBlock(4, 4, drop_path=rate).train()
    x = torch.randn(32, 4, 5, 5)
    torch.manual_seed(7)
    out = block(x)
    torch.manual_seed(7)
    branch = block.branch(x)  # convs and BN draw no random numbers
    mask = torch.empty(32, 1, 1, 1).bernoulli_(1 - rate)
    torch.testing.assert_close(out, torch.relu(branch * mask / (1 - rate) + x))
    assert 0 < int(mask.sum()) < 32
    assert torch.equal(out[mask.flatten() == 0], torch.relu(x[mask.flatten() == 0]))


def test_transformer_block_drops_both_branches_with_separate_draws() -> None:
    torch.manual_seed(0)
    rate, keep = 0.5, 0.5
    block = TransformerBlock(8, 2, drop_path=rate).train()
    x = torch.randn(16, 3, 8)
    torch.manual_seed(11)
    out = block(x)
    torch.manual_seed(11)
    m1 = torch.empty(16, 1, 1).bernoulli_(keep)  # attention dropout is 0: no draws there
    h = x + block.attn(block.ln1(x)) * m1 / keep
    m2 = torch.empty(16, 1, 1).bernoulli_(keep)
    torch.testing.assert_close(out, h + block.mlp(block.ln2(h)) * m2 / keep)
    assert not torch.equal(m1, m2)


def _resnet(drop_path: float) -> ResNet:
    torch.manual_seed(0)
    return ResNet(num_classes=5, in_channels=1, depths=(2, 2), width=8, drop_path=drop_path)


def _gpt(drop_path: float) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=16, drop_path=drop_path)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (_resnet, torch.randn(16, 1, 8, 8)),
        (_gpt, torch.randint(0, 11, (16, 8))),
    ],
    ids=["resnet", "gpt"],
)
def test_models_vary_in_training_and_equal_the_plain_model_in_eval(
    make: Callable[[float], nn.Module], x: torch.Tensor
) -> None:
    plain, dropped = make(0.0), make(0.5)
    # Same state_dict keys with and without drop_path: weights load strictly either way.
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict(), strict=True)
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x), plain(x))
    # (Training-mode calls come last: they move BatchNorm running stats differently.)
    plain.train(), dropped.train()
    assert torch.equal(plain(x), plain(x))  # without drop_path training mode is deterministic
    assert not torch.equal(dropped(x), dropped(x))

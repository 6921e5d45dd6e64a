"""init_weights: each scheme's statistics against its formula, the per-layer-type rules, tied
weights, zero-init of residual branches, clear errors, and the documented example."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.models import GPT, MLP, ResNet
from kiln.models.init import NONLINEARITIES, SCHEMES, init_weights, zero_init_residual_branches

ROOT = Path(__file__).resolve().parents[2]

# Large layers: the empirical std of n draws is within ~1/sqrt(2n) of the truth (~0.1% here),
# so a 3% tolerance never flakes yet catches a wrong fan (2x) or a wrong gain (1.41x).
FAN_IN, FAN_OUT = 1024, 256
REL = 0.03


def _layers() -> dict[str, nn.Module]:
    return {
        "linear": nn.Linear(FAN_IN, FAN_OUT),
        "conv1d": nn.Conv1d(FAN_IN // 4, FAN_OUT, 4),
        "conv2d": nn.Conv2d(FAN_IN // 16, FAN_OUT, 4),
        "conv3d": nn.Conv3d(FAN_IN // 64, FAN_OUT // 4, 4),
    }


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = w[0][0].numel()
    return w.shape[1] * receptive, w.shape[0] * receptive


def _std(scheme: str, w: torch.Tensor, gain: float, mode: str = "fan_in") -> float:
    fan_in, fan_out = _fans(w)
    if scheme.startswith("kaiming"):
        return gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))  # xavier


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize(
    "scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform"]
)
@pytest.mark.parametrize(("nonlinearity", "gain"), [("relu", math.sqrt(2.0)), ("tanh", 5 / 3)])
def test_fan_based_schemes_match_their_formula(
    layer: str, scheme: str, nonlinearity: str, gain: float
) -> None:
    torch.manual_seed(0)
    module = _layers()[layer]
    with torch.no_grad():
        module.bias.uniform_(1.0, 2.0)  # so "biases become zero" is visible
    report = init_weights(module, scheme, nonlinearity=nonlinearity)
    w = module.weight
    expected = _std(scheme, w, gain)
    assert report == {type(module).__name__: 1}
    assert w.std().item() == pytest.approx(expected, rel=REL)
    assert abs(w.mean().item()) < 0.05 * expected
    if scheme.endswith("uniform"):
        bound = math.sqrt(3.0) * expected  # U(-b, b) has std b / sqrt(3)
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound
    assert torch.count_nonzero(module.bias) == 0


def test_kaiming_fan_out_mode_uses_the_output_fan() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    init_weights(layer, "kaiming_normal", mode="fan_out")
    assert layer.weight.std().item() == pytest.approx(
        math.sqrt(2.0 / FAN_OUT), rel=REL
    )  # 2x the fan_in value: the test tells the two apart


def test_leaky_relu_gain_agrees_between_kaiming_and_xavier() -> None:
    torch.manual_seed(0)
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    a, b = nn.Linear(FAN_IN, FAN_OUT), nn.Linear(FAN_IN, FAN_OUT)
    init_weights(a, "kaiming_normal", nonlinearity="leaky_relu")
    init_weights(b, "xavier_normal", nonlinearity="leaky_relu")
    assert a.weight.std().item() == pytest.approx(gain / math.sqrt(FAN_IN), rel=REL)
    assert b.weight.std().item() == pytest.approx(gain * math.sqrt(2 / (FAN_IN + FAN_OUT)), rel=REL)


@pytest.mark.parametrize("shape", [(256, 512), (512, 256)])
@pytest.mark.parametrize(("nonlinearity", "gain"), [("linear", 1.0), ("relu", math.sqrt(2.0))])
def test_orthogonal_rows_or_columns_are_orthonormal(
    shape: tuple[int, int], nonlinearity: str, gain: float
) -> None:
    torch.manual_seed(0)
    out_features, in_features = shape
    layer = nn.Linear(in_features, out_features)
    init_weights(layer, "orthogonal", nonlinearity=nonlinearity)
    w = layer.weight.double()
    gram = w @ w.T if out_features <= in_features else w.T @ w  # the smaller side
    eye = torch.eye(min(shape), dtype=torch.float64)
    torch.testing.assert_close(gram, gain**2 * eye, atol=1e-5, rtol=0)
    assert torch.count_nonzero(layer.bias) == 0


def test_orthogonal_conv_is_orthogonal_once_flattened() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)  # (32, 16*9=144): 32 orthonormal rows
    init_weights(conv, "orthogonal", nonlinearity="linear")
    w = conv.weight.flatten(1).double()
    torch.testing.assert_close(w @ w.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_normal_uses_std_for_weights_and_embeddings(std: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(2000, 256, padding_idx=3), nn.Linear(FAN_IN, FAN_OUT))
    report = init_weights(net, "normal", std=std)
    assert report == {"Embedding": 1, "Linear": 1}
    emb, lin = net[0].weight, net[1].weight
    assert lin.std().item() == pytest.approx(std, rel=REL)
    assert emb.std().item() == pytest.approx(std, rel=REL)
    assert torch.count_nonzero(emb[3]) == 0  # the padding row stays a zero vector
    assert torch.count_nonzero(net[1].bias) == 0


def test_zeros_zeroes_weights_and_biases_and_sets_norms_to_identity() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Conv1d(8, 4, 3), nn.GroupNorm(2, 4))
    for p in net.parameters():
        nn.init.uniform_(p, 1.0, 2.0)
    report = init_weights(net, "zeros")
    assert report == {"Linear": 1, "BatchNorm1d": 1, "Conv1d": 1, "GroupNorm": 1}
    for layer in (net[0], net[2]):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    for norm in (net[1], net[3]):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.count_nonzero(norm.bias) == 0


def test_norms_get_weight_one_bias_zero_and_keep_running_stats() -> None:
    net = nn.Sequential(
        nn.LayerNorm(6), nn.LayerNorm(6, bias=False), nn.RMSNorm(6), nn.BatchNorm2d(6)
    )
    for p in net.parameters():
        nn.init.uniform_(p, 2.0, 3.0)
    bn = net[3]
    bn.running_mean.fill_(5.0)
    init_weights(net, "kaiming_uniform")
    for norm in net:
        assert torch.equal(norm.weight, torch.ones(6))
        if getattr(norm, "bias", None) is not None:
            assert torch.equal(norm.bias, torch.zeros(6))
    assert torch.equal(bn.running_mean, torch.full((6,), 5.0))  # buffers are not touched


def test_default_leaves_the_model_exactly_as_built() -> None:
    torch.manual_seed(0)
    net = ResNet(num_classes=3, in_channels=1, depths=(1, 1), width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init_weights(net, "default") == {}
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_module_with_parameters_is_initialised_or_reported_skipped() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.full((4,), 3.0))

    net = nn.Sequential(nn.Linear(4, 4), Scaled(), nn.MultiheadAttention(4, 2), nn.LSTM(4, 4))
    report = init_weights(net, "xavier_uniform")
    # MultiheadAttention.out_proj is a Linear subclass and is initialised like one.
    assert report == {
        "Linear": 1,
        "skipped:Scaled": 1,
        "skipped:MultiheadAttention": 1,
        "NonDynamicallyQuantizableLinear": 1,
        "skipped:LSTM": 1,
    }
    assert torch.equal(net[1].scale, torch.full((4,), 3.0))


def test_gpt_tied_weight_is_initialised_once_by_the_embedding() -> None:
    torch.manual_seed(0)
    gpt = GPT(vocab_size=512, block_size=8, n_layer=1, n_head=2, n_embd=64)
    built = gpt.tok_emb.weight.clone()
    report = init_weights(gpt, "kaiming_normal")
    # The embedding is left as built and so is the head that shares its weight: a kaiming
    # head (std sqrt(2/64) = 0.18) would have overwritten the 0.02 embedding.
    assert torch.equal(gpt.tok_emb.weight, built)
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert report == {"skipped:Embedding": 2, "LayerNorm": 3, "Linear": 4}

    report = init_weights(gpt, "normal", std=0.1)
    assert report == {"Embedding": 2, "LayerNorm": 3, "Linear": 4}  # lm_head: not twice
    assert gpt.tok_emb.weight.std().item() == pytest.approx(0.1, rel=REL)


def test_zero_init_last_makes_resnet_blocks_start_as_their_shortcut() -> None:
    torch.manual_seed(0)
    net = ResNet(num_classes=2, in_channels=3, depths=(1, 1), width=8)
    report = init_weights(net, "kaiming_normal", zero_init_last=True)
    assert report["zero_init_last"] == 2
    assert report["Conv2d"] == 6  # stem, 2 per block, the projection shortcut
    for stage in net.stages:
        block = stage[0]
        assert torch.count_nonzero(block.branch.bn2.weight) == 0
        assert torch.count_nonzero(block.branch.bn1.weight) == block.branch.bn1.num_features
        x = torch.randn(2, block.branch.conv1.in_channels, 8, 8)
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))


def test_zero_init_last_makes_gpt_blocks_start_as_the_identity() -> None:
    torch.manual_seed(0)
    gpt = GPT(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    x = torch.randn(2, 5, 16)
    assert not torch.equal(gpt.blocks[0](x), x)
    assert init_weights(gpt, "default", zero_init_last=True) == {"zero_init_last": 2}
    for block in gpt.blocks:
        assert torch.equal(block(x), x)
    assert torch.count_nonzero(gpt.blocks[0].attn.qkv.weight) > 0  # the rest is untouched


def test_zero_init_last_calls_the_hook_of_a_user_block() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.norm(self.fc(x))

        def zero_init_last(self) -> None:
            self.calls += 1
            nn.init.zeros_(self.norm.weight)

    net = nn.Sequential(Block(), nn.ReLU(), Block())
    report = init_weights(net, "xavier_normal", zero_init_last=True)
    assert report == {"Linear": 2, "LayerNorm": 2, "zero_init_last": 2}
    assert [net[0].calls, net[2].calls] == [1, 1]
    x = torch.randn(3, 4)
    # Applied after the scheme (which sets norm weights to 1), so the zeros survive.
    torch.testing.assert_close(net[0](x), x)


def test_zero_init_last_without_residual_blocks_is_an_error_that_changes_nothing() -> None:
    class Flagged(nn.Module):  # an attribute with the hook's name is not a hook
        zero_init_last = True

    net = nn.Sequential(MLP(4, 2, hidden=(8,)), Flagged())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"no residual block.*zero_init_last\(\) method"):
        init_weights(net, "zeros", zero_init_last=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="no residual block"):
        zero_init_residual_branches(MLP(4, 2, hidden=(8,)))


def test_unknown_scheme_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="did you mean 'kaiming_normal'") as info:
        init_weights(nn.Linear(2, 2), "kaiming_norm")
    for scheme in SCHEMES:
        assert scheme in str(info.value)
    with pytest.raises(ValueError, match=r"unknown init scheme 'he'; allowed: default,"):
        init_weights(nn.Linear(2, 2), "he")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"std": 0.0}, "positive finite"),
        ({"std": float("nan")}, "positive finite"),
        ({"nonlinearity": "gelu"}, "allowed: " + ", ".join(NONLINEARITIES)),
        ({"nonlinearity": "Relu"}, "did you mean 'relu'"),
        ({"mode": "fan_avg"}, "fan_in' or 'fan_out"),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(pattern)):
        init_weights(nn.Linear(2, 2), "normal", **kwargs)  # type: ignore[arg-type]


def test_not_a_module_and_lazy_layers_are_refused() -> None:
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        init_weights("model", "normal")  # type: ignore[arg-type]
    lazy = nn.Sequential(nn.LazyLinear(4))
    assert init_weights(lazy, "default") == {}  # the default is a no-op for any model
    with pytest.raises(ValueError, match="run one forward pass"):
        init_weights(lazy, "normal")
    lazy(torch.randn(2, 3))
    assert init_weights(lazy, "normal") == {"Linear": 1}


def test_schemes_are_the_configs_choices() -> None:
    # The config validates model.init against its own Literal; both lists must stay equal.
    assert set(get_args(ModelConfig.model_fields["init"].annotation)) == set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_runs_on_the_builtin_models(scheme: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(init=scheme, init_std=0.05)
    for net in (
        MLP(16, 3, hidden=(8,), norm="batch"),
        ResNet(num_classes=3, in_channels=1, depths=(1,), width=4),
        GPT(vocab_size=16, block_size=4, n_layer=1, n_head=1, n_embd=8),
    ):
        residual = not isinstance(net, MLP)
        init_weights(net, cfg.init, std=cfg.init_std, zero_init_last=residual)
        for p in net.parameters():
            assert torch.isfinite(p).all()


def test_docs_example_runs() -> None:
    doc = (ROOT / "docs/techniques/init-and-blocks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks, "the doc has no python example"
    for code in blocks:
        exec(compile(code, "init-and-blocks.md", "exec"), {})

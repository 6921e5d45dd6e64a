"""Activation checkpointing: exact gradients, RNG and BatchNorm parity, unchanged state_dict,
deepcopy / compile / DDP, target selection and its errors, and a measured cut in peak memory."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from kiln.algorithms.activation_checkpointing import (
    apply_activation_checkpointing,
    is_checkpointed,
    remove_activation_checkpointing,
)
from kiln.models import GPT, MLP, ResNet


class Block(nn.Module):
    """A user's residual block, unknown to Kiln."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(x))))


class UserNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _resnet() -> nn.Module:
    return ResNet(num_classes=5, in_channels=1, depths=(2, 1), width=8, drop_path=0.3)


def _mlp() -> nn.Module:
    return MLP(12, 4, hidden=(16, 16, 16), activation="gelu", norm="batch", dropout=0.2)


def _gpt() -> nn.Module:
    return GPT(
        vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=16, dropout=0.1, drop_path=0.3
    )


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], list[str] | None]] = {
    "resnet": (_resnet, lambda: torch.randn(6, 1, 8, 8), None),
    "mlp": (_mlp, lambda: torch.randn(8, 12), None),
    "gpt": (_gpt, lambda: torch.randint(0, 11, (4, 8)), None),
    "user-glob": (UserNet, lambda: torch.randn(8, 6), ["layers.*"]),
}


def _pair(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = make()
    return plain, copy.deepcopy(plain)


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """One training forward/backward from a fixed global seed; the gradients by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(x).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_rng_and_buffers_equal_the_plain_model(case: str) -> None:
    make, data, targets = CASES[case]
    plain, ckpt = _pair(make)
    names = apply_activation_checkpointing(ckpt, targets)
    assert names and all(is_checkpointed(ckpt.get_submodule(n.split("[")[0])) for n in names)
    x = data()
    expected = _grads(plain, x)
    rng_after_plain = torch.get_rng_state()
    got = _grads(ckpt, x)
    assert got.keys() == expected.keys() and len(got) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    # The recomputation restored the RNG it used: the global stream is where the plain run left
    # it, so the next batch's dropout / DropPath masks are the same too.
    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # BN stats updated once


def test_same_seed_same_grads_with_drop_path_and_a_different_seed_differs() -> None:
    plain, ckpt = _pair(_gpt)
    apply_activation_checkpointing(ckpt)
    x = torch.randint(0, 11, (4, 8))
    a, b = _grads(ckpt, x, seed=5), _grads(ckpt, x, seed=5)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c = _grads(ckpt, x, seed=6)  # other DropPath/dropout masks: the check above could fail
    assert any(not torch.equal(a[n], c[n]) for n in a)
    ref = _grads(plain, x, seed=6)
    assert all(torch.equal(ref[n], c[n]) for n in ref)


def test_batchnorm_stats_would_move_twice_without_the_restore() -> None:
    # The control for the buffer check above: raw checkpoint() updates BN stats twice.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    raw = copy.deepcopy(block)
    x = torch.randn(8, 4)
    block(x).sum().backward()
    checkpoint(raw, x, use_reentrant=False).sum().backward()
    assert int(raw[1].num_batches_tracked) == 2 * int(block[1].num_batches_tracked)
    assert not torch.equal(raw[1].running_mean, block[1].running_mean)


@pytest.mark.parametrize("case", ["resnet", "mlp", "gpt"])
def test_state_dict_keys_unchanged_and_loadable_both_ways(case: str) -> None:
    plain, ckpt = _pair(CASES[case][0])
    apply_activation_checkpointing(ckpt)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(ckpt.state_dict(), strict=True)
    ckpt.load_state_dict(plain.state_dict(), strict=True)


def test_deepcopy_checkpoints_the_copy_with_its_own_weights() -> None:
    plain, ckpt = _pair(_resnet)
    apply_activation_checkpointing(ckpt)
    clone = copy.deepcopy(ckpt)
    block = clone.get_submodule("stages.0.0")
    assert is_checkpointed(block)
    assert block.forward.args[0] is block  # bound to the copy, not to the original
    x = torch.randn(6, 1, 8, 8)
    expected = _grads(plain, x)
    got = _grads(clone, x)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(p.grad is None for p in ckpt.parameters())  # the original was not run


class _Counter:
    """Counts forward calls of a module (recomputation included) through a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.calls += 1


def test_recomputes_once_is_idempotent_and_removable() -> None:
    net = UserNet()
    inner = _Counter(net.layers[1].fc1)  # inside a block: counts its recomputation too
    x = torch.randn(4, 6)

    def calls() -> int:
        inner.calls = 0
        net(x).sum().backward()
        return inner.calls

    assert calls() == 1
    names = apply_activation_checkpointing(net, ["layers.*"])
    forward = net.layers[1].forward
    assert calls() == 2  # forward + one recomputation in backward
    assert apply_activation_checkpointing(net, "layers.*") == names  # not wrapped twice
    assert apply_activation_checkpointing(net, ["layers.1.fc1"]) == []  # already inside one
    assert net.layers[1].forward is forward
    assert calls() == 2
    with torch.no_grad():
        inner.calls = 0
        net(x)
        assert inner.calls == 1  # no checkpoint without grad
    assert remove_activation_checkpointing(net) == names
    assert "forward" not in net.layers[1].__dict__
    assert calls() == 1
    assert remove_activation_checkpointing(net) == []


def test_targets_by_class_class_name_and_outermost_match() -> None:
    net = UserNet()
    expected = ["layers.0", "layers.1", "layers.2"]
    assert apply_activation_checkpointing(net, [Block]) == expected
    remove_activation_checkpointing(net)
    assert apply_activation_checkpointing(net, "Block") == expected
    remove_activation_checkpointing(net)
    # "layers*" matches the ModuleList and everything in it: only the outermost is wrapped.
    assert apply_activation_checkpointing(net, ["layers*", "layers.0.fc1"]) == ["layers"]


def test_default_blocks_of_kiln_models() -> None:
    assert apply_activation_checkpointing(_resnet()) == ["stages.0.0", "stages.0.1", "stages.1.0"]
    assert apply_activation_checkpointing(_gpt()) == ["blocks.0", "blocks.1", "blocks.2"]
    # MLP: one group per hidden Linear (Linear, BatchNorm1d, GELU, Dropout).
    assert apply_activation_checkpointing(_mlp()) == ["hidden[0:4]", "hidden[4:8]", "hidden[8:12]"]
    outer = nn.Sequential(_mlp(), nn.ReLU())  # found inside a user's container too
    assert apply_activation_checkpointing(outer)[0] == "0.hidden[0:4]"


def test_unknown_model_without_targets_lists_candidates_and_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        apply_activation_checkpointing(UserNet())
    msg = str(err.value)
    assert "UserNet has no default blocks" in msg
    assert "targets=['layers.*']" in msg and "targets=[MyBlock]" in msg
    assert "layers.0 (Block)" in msg and "layers.2 (Block)" in msg
    with pytest.raises(ValueError, match="needs hidden layers"):
        apply_activation_checkpointing(MLP(4, 2, hidden=()))


def test_no_match_and_bad_targets_say_what_exists() -> None:
    with pytest.raises(ValueError) as err:
        apply_activation_checkpointing(UserNet(), ["blocks.*"])
    msg = str(err.value)
    assert "['blocks.*'] matched no module of UserNet" in msg
    assert "embed, layers, layers.0" in msg and "layers.0 (Block)" in msg
    with pytest.raises(TypeError, match="module-name glob"):
        apply_activation_checkpointing(UserNet(), [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="targets is empty"):
        apply_activation_checkpointing(UserNet(), [])


def test_user_instance_forward_is_kept_and_restored() -> None:
    net = UserNet().eval()  # no dropout: compare outputs of separate calls
    block = net.layers[0]

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return 2 * Block.forward(block, x)

    block.forward = doubled
    x = torch.randn(3, 16, requires_grad=True)
    expected = doubled(x)
    apply_activation_checkpointing(net, ["layers.0"])
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    remove_activation_checkpointing(net)
    assert block.forward is doubled


def test_torch_compile_gives_the_same_gradients() -> None:
    # aot_eager traces with Dynamo and AOTAutograd like inductor does, without the slow codegen.
    for make, x in ((_mlp, torch.randn(8, 12)), (UserNet, torch.randn(8, 6))):
        plain, ckpt = _pair(make)
        apply_activation_checkpointing(ckpt, None if make is _mlp else ["layers.*"])
        compiled = torch.compile(ckpt, backend="aot_eager", fullgraph=True)
        expected = _grads(plain, x)
        got = _grads(compiled, x)
        for name in expected:
            torch.testing.assert_close(got[f"_orig_mod.{name}"], expected[name])


def test_under_ddp_and_through_the_wrapper(tmp_path: Path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    plain, ckpt = _pair(_resnet)
    ddp = nn.parallel.DistributedDataParallel(ckpt)
    assert apply_activation_checkpointing(ddp)[0] == "stages.0.0"  # unwrapped: user's names
    x = torch.randn(6, 1, 8, 8)
    expected = _grads(plain, x)
    got = _grads(ddp, x)
    for name in expected:
        torch.testing.assert_close(got[f"module.{name}"], expected[name], rtol=0, atol=0)


def _peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak of live CPU allocations during one forward + backward, above the level at its start.

    The profiler records every allocation and free of torch's CPU allocator in order, so the
    running sum is exact and the same on every run (unlike process RSS, which depends on
    malloc's caching).
    """
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).sum().backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: MLP(64, 10, hidden=(256,) * 12, activation="gelu", norm="layer"), (256, 64)),
        (lambda: ResNet(num_classes=10, in_channels=1, depths=(3, 3, 3), width=8), (16, 1, 32, 32)),
    ],
    ids=["deep-mlp", "resnet"],
)
def test_peak_memory_of_forward_backward_is_much_lower(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    plain, ckpt = _pair(make)
    apply_activation_checkpointing(ckpt)
    x = torch.randn(shape)
    before, after = _peak_bytes(plain, x), _peak_bytes(ckpt, x)
    assert before > 2**20  # the measurement saw the activations
    assert after <= 0.7 * before, (before, after)  # >= 30% lower (measured: ~55-60%)

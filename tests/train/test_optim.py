"""Parameter groups, optimizers and LR schedules against reference formulas."""

from __future__ import annotations

import copy
import io
import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kiln.config import OptimConfig, SchedulerConfig
from kiln.train.optim import Schedule, build_optimizer, build_scheduler, param_groups


class Biased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, 3))  # 2-D: only the name rule exempts it


class Net(nn.Module):
    """Conv, BN, 2-D LayerNorm, embedding, 1-D scale, 2-D bias, frozen layer: every decay case."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.emb = nn.Embedding(5, 4)
        self.ln = nn.LayerNorm((2, 4))  # 2-D weight: only the norm-layer rule exempts it
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.pos = Biased()
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def by_param(groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in groups for p in g["params"]}


def test_no_decay_for_bias_norm_and_1d_params() -> None:
    net = Net()
    groups = param_groups(net, OptimConfig(weight_decay=0.1))
    wd = {
        n: by_param(groups)[id(p)]["weight_decay"]
        for n, p in net.named_parameters()
        if p.requires_grad
    }
    assert wd == {
        "conv.weight": 0.1,
        "conv.bias": 0.0,
        "bn.weight": 0.0,
        "bn.bias": 0.0,
        "emb.weight": 0.1,
        "ln.weight": 0.0,
        "ln.bias": 0.0,
        "fc.weight": 0.1,
        "fc.bias": 0.0,
        "scale": 0.0,
        "pos.bias": 0.0,
    }
    counts = Counter(id(p) for g in groups for p in g["params"])
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(counts) == trainable and set(counts.values()) == {1}
    assert sorted(g["name"] for g in groups) == ["decay", "no_decay"]
    assert all(g["lr"] == 1e-3 for g in groups)


def test_decay_everywhere_when_switched_off() -> None:
    groups = param_groups(Net(), OptimConfig(weight_decay=0.1, no_decay_bias_norm=False))
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("decay", 0.1, 11)
    ]


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_rmsnorm_is_a_norm_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm((2, 4)))  # 2-D weight
    groups = by_param(param_groups(model, OptimConfig(weight_decay=0.1)))
    assert groups[id(model[1].weight)]["weight_decay"] == 0.0


def manual_adamw(
    params: list[torch.Tensor],
    decay: list[bool],
    lr: float,
    wd: float,
    betas: tuple[float, float],
    eps: float,
    state: dict[int, Any],
) -> None:
    """AdamW as written in Loshchilov & Hutter / the torch docs, one tensor at a time."""
    b1, b2 = betas
    with torch.no_grad():
        for i, (p, d) in enumerate(zip(params, decay, strict=True)):
            m, v, t = state.get(i, (torch.zeros_like(p), torch.zeros_like(p), 0))
            t += 1
            g = p.grad
            assert g is not None
            if d:
                p.mul_(1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
            state[i] = (m, v, t)


def test_adamw_groups_match_manual_two_group_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).double()
    ref = copy.deepcopy(model)
    cfg = OptimConfig(name="adamw", lr=0.05, weight_decay=0.5, betas=(0.8, 0.99), eps=1e-8)
    opt = build_optimizer(model, cfg)
    x = torch.randn(16, 6, dtype=torch.float64)
    decay = [n in ("0.weight", "3.weight") for n, _ in ref.named_parameters()]
    state: dict[int, Any] = {}
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            m(x).pow(2).mean().backward()
        opt.step()
        manual_adamw(
            list(ref.parameters()), decay, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, state
        )
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")
    moved = [(p - p0).abs().max().item() for p, p0 in zip(model.parameters(), start, strict=True)]
    assert min(moved) > 0.05  # every tensor, decayed or not, really trained


def test_cpu_optimizers_use_the_fused_kernels() -> None:
    for name in ("sgd", "adam", "adamw"):
        assert build_optimizer(nn.Linear(2, 2), OptimConfig(name=name)).defaults["fused"] is True


def test_optimizer_hyperparameters_reach_torch() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name="sgd", momentum=0.8, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    assert (opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.8, True)
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name="adam", betas=(0.5, 0.6), eps=1e-3))
    assert type(opt) is torch.optim.Adam
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.5, 0.6), 1e-3)


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_lr_mult_first_matching_pattern_wins() -> None:
    model = TwoPart()
    cfg = OptimConfig(lr=0.1, weight_decay=0.01, lr_mult={"backbone.0.*": 0.5, "backbone.*": 0.1})
    groups = by_param(build_optimizer(model, cfg).param_groups)
    lrs = {n: groups[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lrs == pytest.approx(
        {
            "backbone.0.weight": 0.05,
            "backbone.0.bias": 0.05,
            "backbone.1.weight": 0.01,
            "backbone.1.bias": 0.01,
            "head.weight": 0.1,
            "head.bias": 0.1,
        }
    )
    assert groups[id(model.backbone[1].weight)]["name"] == "decay x0.1"
    # Reversed order: the broad pattern now claims all of the backbone.
    cfg = OptimConfig(lr=0.1, weight_decay=0.01, lr_mult={"backbone.*": 0.1, "backbone.0.*": 0.5})
    groups = by_param(param_groups(model, cfg))
    assert groups[id(model.backbone[0].weight)]["lr"] == pytest.approx(0.01)


def test_lr_mult_pattern_matching_nothing_raises() -> None:
    with pytest.raises(ValueError, match=r"'bakbone\.\*' matches no parameter") as err:
        param_groups(TwoPart(), OptimConfig(lr_mult={"bakbone.*": 0.1}))
    assert "backbone.0.weight" in str(err.value) and "backbone.*" in str(err.value)
    with pytest.raises(ValueError, match="finite number >= 0"):
        param_groups(TwoPart(), OptimConfig(lr_mult={"head.*": -1.0}))


def test_tied_parameter_appears_once_and_alias_names_match() -> None:
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight
    groups = param_groups(model, OptimConfig(lr=1.0, lr_mult={"1.*": 0.5}))
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids == [id(model[0].weight)]
    assert groups[0]["lr"] == 0.5  # matched through its second name, "1.weight"
    build_optimizer(model, OptimConfig())  # torch refuses a parameter listed twice


def test_all_frozen_raises() -> None:
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="all parameters of Linear are frozen"):
        build_optimizer(model, OptimConfig())


def test_nesterov_needs_momentum_and_sgd() -> None:
    with pytest.raises(ValueError, match=r"nesterov=true needs optim\.momentum > 0"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(name="sgd", momentum=0.0, nesterov=True))
    with pytest.raises(ValueError, match="applies to sgd only"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(name="adamw", nesterov=True))


# --------------------------------------------------------------------------- schedules


def one_param_opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def run(sched: Schedule, n: int, metrics: list[float] | None = None) -> list[list[float]]:
    """LRs of updates 0..n: record, then optimizer.step() and schedule.step() as a loop does."""
    lrs = [sched.last_lr()]
    for i in range(n):
        sched.optimizer.step()
        sched.step(metrics[i] if metrics else None)
        lrs.append(sched.last_lr())
    return lrs


def build(cfg: SchedulerConfig, opt: torch.optim.Optimizer | None = None, **kw: int) -> Schedule:
    sched = build_scheduler(
        opt or one_param_opt(), cfg, **{"steps_per_epoch": 5, "epochs": 4, **kw}
    )
    assert sched is not None
    return sched


def test_none_builds_nothing() -> None:
    opt = one_param_opt()
    assert build_scheduler(opt, SchedulerConfig(), steps_per_epoch=5, epochs=4) is None


@pytest.mark.parametrize(
    ("name", "interval"),
    [
        ("step", "epoch"),
        ("multistep", "epoch"),
        ("exponential", "epoch"),
        ("cosine", "step"),
        ("warmup_cosine", "step"),
        ("linear", "step"),
        ("onecycle", "step"),
        ("plateau", "plateau"),
    ],
)
def test_interval(name: str, interval: str) -> None:
    extra = {"step": {"step_size": 2}, "multistep": {"milestones": [2]}}.get(name, {})
    assert build(SchedulerConfig(name=name, **extra)).interval == interval


def test_cosine_curve() -> None:
    lrs = run(build(SchedulerConfig(name="cosine", min_lr=0.01)), 20)
    for s in (0, 3, 10, 17, 19, 20):
        assert lrs[s][0] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * s / 20)))
    assert lrs[0][0] == pytest.approx(0.1) and lrs[20][0] == pytest.approx(0.01)


def test_warmup_cosine_curve() -> None:
    lrs = run(build(SchedulerConfig(name="warmup_cosine", warmup_steps=4, min_lr=0.01)), 20)
    for s in range(4):
        assert lrs[s][0] == pytest.approx(0.1 * (s + 1) / 5)
    assert lrs[4][0] == 0.1  # exactly the peak at the end of warmup
    for s in (5, 12, 19):
        cos = 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert lrs[s][0] == pytest.approx(0.01 + 0.09 * cos)
    assert lrs[20][0] == pytest.approx(0.01)


def test_warmup_fraction_of_total() -> None:
    lrs = run(build(SchedulerConfig(name="warmup_cosine", warmup_fraction=0.25)), 6)
    assert lrs[4][0] == pytest.approx(0.1 * 5 / 6) and lrs[5][0] == 0.1  # 0.25 * 20 = 5


def test_linear_curve_with_and_without_warmup() -> None:
    lrs = run(build(SchedulerConfig(name="linear", warmup_steps=2, min_lr=0.02), epochs=2), 10)
    assert [lr[0] for lr in lrs[:3]] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    for s in (3, 6, 9, 10):
        assert lrs[s][0] == pytest.approx(0.1 - 0.08 * (s - 2) / 8)
    lrs = run(build(SchedulerConfig(name="linear"), total_steps=4), 4)
    assert [lr[0] for lr in lrs] == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])


def test_onecycle_peaks_at_pct_start() -> None:
    sched = build(SchedulerConfig(name="onecycle", max_lr=0.5, pct_start=0.3), total_steps=100)
    lrs = [lr[0] for lr in run(sched, 99)]
    assert lrs[0] == pytest.approx(0.02)  # max_lr / 25
    assert max(lrs) == lrs[29] == pytest.approx(0.5)  # peak after pct_start * 100 - 1 updates
    assert lrs[10] == pytest.approx(0.5 + (0.02 - 0.5) / 2 * (1 + math.cos(math.pi * 10 / 29)))
    assert lrs[99] == pytest.approx(0.02 / 1e4)
    sched = build(SchedulerConfig(name="onecycle", min_lr=1e-4), total_steps=100)
    lrs = [lr[0] for lr in run(sched, 99)]
    assert max(lrs) == pytest.approx(0.1) and lrs[99] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("cfg", "formula"),
    [
        (SchedulerConfig(name="step", step_size=2, gamma=0.5), lambda e: 0.1 * 0.5 ** (e // 2)),
        (
            SchedulerConfig(name="multistep", milestones=[2, 5], gamma=0.1),
            lambda e: 0.1 * 0.1 ** sum(m <= e for m in (2, 5)),
        ),
        (SchedulerConfig(name="exponential", gamma=0.9), lambda e: 0.1 * 0.9**e),
    ],
)
def test_epoch_schedules(cfg: SchedulerConfig, formula: Any) -> None:
    sched = build(cfg, epochs=8)
    assert sched.interval == "epoch"
    lrs = run(sched, 7)
    assert [lr[0] for lr in lrs] == pytest.approx([formula(e) for e in range(8)])


def test_plateau_reduces_after_patience_plus_one_bad_epochs() -> None:
    metrics = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the first sets the best; then all are bad
    sched = build(SchedulerConfig(name="plateau", patience=2, factor=0.5))
    lrs = [lr[0] for lr in run(sched, len(metrics), metrics)]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    # An improvement resets the count: two bad, one better, two bad -> no cut.
    sched = build(SchedulerConfig(name="plateau", patience=2, factor=0.5))
    metrics = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    assert [lr[0] for lr in run(sched, len(metrics), metrics)] == pytest.approx([0.1] * 7)


def test_metric_is_required_by_plateau_only() -> None:
    sched = build(SchedulerConfig(name="plateau"))
    with pytest.raises(ValueError, match=r"needs the monitored metric: call schedule.step\("):
        sched.step()
    with pytest.raises(ValueError, match="does not use a metric"):
        build(SchedulerConfig(name="cosine")).step(0.3)


ROUND_TRIP = [
    SchedulerConfig(name="step", step_size=3, gamma=0.5),
    SchedulerConfig(name="multistep", milestones=[4, 9], gamma=0.5),
    SchedulerConfig(name="exponential", gamma=0.8),
    SchedulerConfig(name="cosine", min_lr=0.001),
    SchedulerConfig(name="warmup_cosine", warmup_steps=5, min_lr=0.001),
    SchedulerConfig(name="linear", warmup_fraction=0.2),
    SchedulerConfig(name="onecycle", max_lr=0.3, min_lr=1e-5),
    SchedulerConfig(name="plateau", patience=1, factor=0.5),
]


def fresh(cfg: SchedulerConfig) -> tuple[nn.Module, torch.optim.Optimizer, Schedule]:
    torch.manual_seed(0)
    model = TwoPart()
    opt = build_optimizer(
        model, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, lr_mult={"backbone.*": 0.1})
    )
    sched = build_scheduler(opt, cfg, steps_per_epoch=2, epochs=12)
    assert sched is not None
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model, opt, sched


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: c.name)
@pytest.mark.parametrize("load_optimizer", [True, False])
def test_state_dict_round_trip(cfg: SchedulerConfig, load_optimizer: bool) -> None:
    metrics = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    if cfg.name != "plateau":
        metrics = []
    _, opt, sched = fresh(cfg)
    before = run(sched, 7, metrics)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    _, opt2, sched2 = fresh(cfg)
    if load_optimizer:
        opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.last_lr() == before[-1]
    after = run(sched, 5, metrics[7:])
    assert run(sched2, 5, metrics[7:]) == after
    assert len({lr[0] for lr in before + after}) > 2  # the LR really moves in this window


def test_loading_another_schedule_raises() -> None:
    _, _, sched = fresh(ROUND_TRIP[0])
    _, _, other = fresh(ROUND_TRIP[3])
    with pytest.raises(ValueError, match="checkpoint holds a 'step' schedule"):
        other.load_state_dict(sched.state_dict())


@pytest.mark.parametrize(
    "cfg",
    [
        SchedulerConfig(name="warmup_cosine", warmup_steps=3, min_lr=0.002),
        SchedulerConfig(name="linear", min_lr=0.002),
        SchedulerConfig(name="cosine", min_lr=0.002),
        SchedulerConfig(name="onecycle", min_lr=1e-4),
        SchedulerConfig(name="onecycle", max_lr=0.4, min_lr=1e-4),
    ],
    ids=lambda c: f"{c.name}-{c.max_lr}",
)
def test_group_multiplier_holds_through_the_schedule(cfg: SchedulerConfig) -> None:
    _, opt, sched = fresh(cfg)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay x0.1", "no_decay x0.1", "decay", "no_decay"]
    mults = torch.tensor([g["lr_mult"] for g in opt.param_groups], dtype=torch.float64)
    # onecycle ends on the last update (T - 1); the LambdaLR curves after it (T), like torch's
    # CosineAnnealingLR.
    for lrs in run(sched, 23 if cfg.name == "onecycle" else 24):
        ratio = torch.tensor(lrs, dtype=torch.float64) / mults
        assert_close(ratio, torch.full((4,), lrs[-1], dtype=torch.float64))
    assert sched.last_lr()[-1] == pytest.approx(cfg.min_lr)
    assert sched.last_lr()[0] == pytest.approx(cfg.min_lr * 0.1)


@pytest.mark.parametrize(
    ("cfg", "kw", "match"),
    [
        (SchedulerConfig(name="warmup_cosine", warmup_steps=20), {}, "warmup .20 updates. must"),
        (SchedulerConfig(name="linear", warmup_steps=2, warmup_fraction=0.5), {}, "not both"),
        (SchedulerConfig(name="multistep", milestones=[5, 3]), {}, "strictly increasing"),
        (SchedulerConfig(name="multistep", milestones=[2, 4]), {}, r"must lie in 1\.\.3"),
        (SchedulerConfig(name="step", step_size=4), {}, "never decays"),
        (SchedulerConfig(name="cosine"), {"steps_per_epoch": 0}, "0 updates"),
        (SchedulerConfig(name="cosine"), {"total_steps": 0}, "total_steps must be >= 1"),
        (SchedulerConfig(name="cosine", warmup_steps=2), {}, "warmup_steps=2 has no effect"),
        (SchedulerConfig(name="step", step_size=2, min_lr=0.1), {}, "min_lr=0.1 has no effect"),
        (SchedulerConfig(name="linear", min_lr=0.5), {}, "min_lr=0.5 is above"),
        (SchedulerConfig(name="onecycle", pct_start=0.05), {}, "more than 1 warmup update"),
        (SchedulerConfig(name="onecycle", min_lr=0.01), {}, "below onecycle's start LR"),
    ],
)
def test_impossible_settings_say_what_to_change(
    cfg: SchedulerConfig, kw: dict[str, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build(cfg, **kw)


def test_no_weight_decay_gives_one_group_per_multiplier() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = param_groups(model, OptimConfig(weight_decay=0.0))
    assert [g["name"] for g in groups] == ["all"]
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    split = param_groups(model, OptimConfig(weight_decay=0.0, lr_mult={"2.*": 0.1}))
    assert [g["name"] for g in split] == ["all", "all x0.1"]

"""MAML and FOMAML: meta-gradients against references, the sine tasks, the runner and the CLI.

The references below use plain ``torch.autograd`` (no ``torch.func``): a second-order
meta-gradient must equal central finite differences of the query loss after adaptation, and a
first-order one must equal the query gradient at the adapted parameters (the Hessian term
dropped).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runners import ROOT, run_kiln
from torch import nn
from torch.func import functional_call

from kiln.config import load_config
from kiln.meta import (
    SineTasks,
    TaskBatch,
    adaptation_losses,
    check_functional,
    meta_gradient,
    meta_loss,
    params_of,
)
from kiln.meta.runner import check_meta_config, run_meta

F64 = torch.float64
STEPS, LR = 2, 0.1  # two inner steps, a large LR: the second-order terms matter


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)


def _tasks(n: int = 3) -> TaskBatch:
    return SineTasks().sample(
        n, shots=4, query=5, generator=torch.Generator().manual_seed(1), dtype=F64
    )


def _reference_adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """Inner SGD with torch.autograd.grad on parameters that require grad."""
    for _ in range(STEPS):
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: v - LR * g for (k, v), g in zip(params.items(), grads, strict=True)}
    return params


def _reference_loss(model: nn.Module, params: dict[str, torch.Tensor], tasks: TaskBatch) -> float:
    total = 0.0
    for sx, sy, qx, qy in zip(*tasks, strict=True):
        start = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        adapted = _reference_adapt(model, start, sx, sy, create_graph=False)
        total += F.mse_loss(functional_call(model, adapted, (qx,)), qy).item()
    return total / tasks.num_tasks


def test_second_order_meta_gradient_equals_finite_differences() -> None:
    model, tasks = _tiny(), _tasks()
    params = params_of(model)
    grads, loss = meta_gradient(model, params, tasks, steps=STEPS, lr=LR)
    assert loss.item() == pytest.approx(_reference_loss(model, params, tasks), rel=1e-12)

    eps = 1e-6
    for name, value in params.items():
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                moved = value.clone()
                moved.view(-1)[i] += sign * eps
                shifted.append(_reference_loss(model, {**params, name: moved}, tasks))
            fd.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * eps)
        torch.testing.assert_close(grads[name], fd, rtol=1e-6, atol=1e-9, msg=name)


def test_first_order_drops_the_hessian_term() -> None:
    model, tasks = _tiny(), _tasks()
    params = params_of(model)
    second, _ = meta_gradient(model, params, tasks, steps=STEPS, lr=LR)
    first, loss = meta_gradient(model, params, tasks, steps=STEPS, lr=LR, first_order=True)
    assert loss.item() == pytest.approx(_reference_loss(model, params, tasks), rel=1e-12)

    # FOMAML: the mean over tasks of grad L_query at the adapted parameters theta'.
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for sx, sy, qx, qy in zip(*tasks, strict=True):
        start = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        adapted = {
            k: v.detach().requires_grad_(True)
            for k, v in _reference_adapt(model, start, sx, sy, create_graph=False).items()
        }
        query = F.mse_loss(functional_call(model, adapted, (qx,)), qy)
        for k, g in zip(adapted, torch.autograd.grad(query, list(adapted.values())), strict=True):
            expected[k] += g / tasks.num_tasks
    for name in params:
        torch.testing.assert_close(first[name], expected[name], rtol=1e-10, atol=1e-12)
    gap = max((first[k] - second[k]).abs().max().item() for k in params)
    scale = max(second[k].abs().max().item() for k in params)
    assert gap > 1e-2 * scale, (gap, scale)


def test_meta_loss_without_inner_steps_is_the_plain_query_loss() -> None:
    model, tasks = _tiny(), _tasks()
    expected = torch.stack(
        [F.mse_loss(model(qx), qy) for qx, qy in zip(tasks.query_x, tasks.query_y, strict=True)]
    ).mean()
    got = meta_loss(model, params_of(model), tasks, steps=0, lr=LR)
    torch.testing.assert_close(got, expected.detach())


def test_adaptation_losses_match_sgd_on_a_copy() -> None:
    model, tasks = _tiny(), _tasks(2)
    losses = adaptation_losses(model, params_of(model), tasks, steps=[3, 0, 1], lr=LR)
    assert losses.shape == (3, 2)
    for t in range(2):
        net = _tiny()
        sgd = torch.optim.SGD(net.parameters(), lr=LR)
        by_step = {}
        for step in range(4):
            with torch.no_grad():
                by_step[step] = F.mse_loss(net(tasks.query_x[t]), tasks.query_y[t])
            F.mse_loss(net(tasks.support_x[t]), tasks.support_y[t]).backward()
            sgd.step()
            sgd.zero_grad()
        expected = torch.stack([by_step[3], by_step[0], by_step[1]])
        torch.testing.assert_close(losses[:, t], expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        adaptation_losses(model, params_of(model), tasks, steps=[-1], lr=LR)


def test_sine_tasks_are_seeded_in_range_and_follow_the_formula() -> None:
    tasks = SineTasks()
    torch.manual_seed(123)
    a = tasks.sample(50, shots=10, query=7, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(456)  # the global RNG plays no part
    b = tasks.sample(50, shots=10, query=7, generator=torch.Generator().manual_seed(5))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = tasks.sample(50, shots=10, query=7, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (50, 10, 1) and a.query_y.shape == (50, 7, 1)

    amp, phase = tasks.sample_parameters(50, generator=torch.Generator().manual_seed(5))
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0.0 and phase.max() <= math.pi
    x = torch.cat([a.support_x, a.query_x], dim=1)
    y = torch.cat([a.support_y, a.query_y], dim=1)
    assert x.min() >= -5.0 and x.max() <= 5.0
    torch.testing.assert_close(y, amp[:, None, None] * torch.sin(x - phase[:, None, None]))
    with pytest.raises(ValueError, match="shots must be at least 1"):
        tasks.sample(2, shots=0, query=1, generator=torch.Generator())


def test_models_and_settings_the_meta_loop_refuses() -> None:
    with pytest.raises(ValueError, match="without buffers"):
        check_functional(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="dropout"):
        check_functional(nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.1)))
    with pytest.raises(ValueError, match="set precision=fp32"):
        check_meta_config(load_config(None, ["meta.enabled=true", "precision=bf16"]))
    with pytest.raises(ValueError, match=r"scheduler\.name=none"):
        check_meta_config(load_config(None, ["meta.enabled=true", "scheduler.name=cosine"]))
    with pytest.raises(ValueError, match="eval_inner_steps"):
        check_meta_config(load_config(None, ["meta.enabled=true", "meta.eval_inner_steps=[]"]))


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_maml_beats_the_pretrained_baseline_after_adaptation(method: str, tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "configs/maml_sine.yaml",
        [
            f"meta.method={method}",
            "meta.meta_steps=800",
            "meta.eval_tasks=100",
            f"out_dir={tmp_path}",
            "log.tensorboard=false",
            "log.progress=false",
        ],
    )
    summary = run_meta(cfg, verbose=False)
    rows = {row["inner_steps"]: row for row in summary["table"]}
    assert sorted(rows) == [0, 1, 10]
    # Same initial weights, same tasks and updates: before adapting, both sit near the mean curve
    # (MSE ~3); after 1 and 10 steps the meta-learned start is far ahead (about 0.6x and 0.5x the
    # baseline's MSE at 800 meta-steps, 100 tasks x 100 query points).
    for k in (1, 10):
        assert rows[k]["maml_mse"] < 0.85 * rows[k]["baseline_mse"], (k, rows[k])
    assert rows[10]["maml_mse"] < rows[1]["maml_mse"] < rows[0]["maml_mse"]
    run = Path(summary["run_dir"])
    assert json.loads((run / "summary.json").read_text())["table"] == summary["table"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("meta/query_loss" in r for r in logged) and any("baseline/loss" in r for r in logged)


def test_cli_runs_maml_sine_end_to_end(tmp_path: Path) -> None:
    proc = run_kiln(
        "train",
        str(ROOT / "configs/maml_sine.yaml"),
        "meta.meta_steps=20",
        "name=m",
        f"out_dir={tmp_path}",
        "log.tensorboard=false",
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "m"
    assert f"run directory: {run}" in proc.stdout and "pretrained baseline" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["meta_steps"] == 20 and summary["eval_tasks"] == 600
    assert [r["inner_steps"] for r in summary["table"]] == [0, 1, 10]
    for f in ("config.yaml", "metrics.jsonl", "maml.safetensors", "baseline.safetensors"):
        assert (run / f).is_file(), f
    assert load_config(run / "config.yaml").meta.meta_steps == 20

    refused = run_kiln(
        "train", str(ROOT / "configs/maml_sine.yaml"), "precision=bf16", f"out_dir={tmp_path}"
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "set precision=fp32" in refused.stderr

"""Multi-task training from a config: multi-target data, dict outputs, learned task weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runners import run_kiln

from kiln.config import DataConfig
from kiln.data import build_data
from kiln.losses import MultiTaskCriterion
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.metrics import build_metrics
from kiln.train.trainer import Trainer, TrainingInterrupted

MT = ("data.name=digits_multitask", "model.name=multihead", "model.kwargs.hidden=[32]")
TASKS = [
    {"name": "digit", "task": "classification", "num_classes": 10},
    {"name": "parity", "task": "classification", "num_classes": 2},
]


def test_source_has_two_targets_with_noise_only_in_train() -> None:
    cfg = DataConfig(name="digits_multitask", parity_noise=0.3)
    bundle = build_data(cfg, seed=0)
    plain = build_data(DataConfig(name="digits"), seed=0)
    assert bundle.info.task == "multitask"
    assert [t["name"] for t in bundle.info.tasks or []] == ["digit", "parity"]
    assert list(bundle.train.indices) == list(plain.train.indices)  # the same split as digits
    y = bundle.train.dataset.y
    train = torch.as_tensor(bundle.train.indices)
    digit, parity = y[:, 0].long(), y[:, 1].long()
    assert torch.equal(digit, plain.train.dataset.y)
    flipped = (parity[train] != digit[train] % 2).float().mean().item()
    assert 0.25 < flipped < 0.35
    for split in (bundle.val, bundle.test):
        idx = torch.as_tensor(split.indices)
        assert torch.equal(parity[idx], digit[idx] % 2)  # evaluation keeps the true labels


def test_criterion_matches_uncertainty_formula_and_checks_inputs() -> None:
    crit = MultiTaskCriterion(TASKS)
    with torch.no_grad():
        crit.combine.log_vars.copy_(torch.tensor([0.5, -0.3]))
    torch.manual_seed(0)
    out = {"digit": torch.randn(6, 10), "parity": torch.randn(6, 2)}
    y = torch.stack([torch.randint(0, 10, (6,)), torch.randint(0, 2, (6,))], 1).float()
    ce_d = F.cross_entropy(out["digit"], y[:, 0].long())
    ce_p = F.cross_entropy(out["parity"], y[:, 1].long())
    s_d, s_p = torch.tensor(0.5), torch.tensor(-0.3)
    expected = torch.exp(-s_d) * ce_d + s_d + torch.exp(-s_p) * ce_p + s_p
    assert torch.allclose(crit(out, y), expected, atol=1e-6)
    assert torch.allclose(crit(out, y, reduction="sum"), 6 * expected, atol=1e-5)
    with pytest.raises(ValueError, match="must return a dict"):
        crit(torch.zeros(6, 10), y)
    with pytest.raises(ValueError, match=r"targets must be \[N, 2\]"):
        crit(out, y[:, 0])
    with pytest.raises(ValueError, match="missing \\['parity'\\]"):
        MultiTaskCriterion(TASKS, weights={"digit": 1.0})
    fixed = MultiTaskCriterion(TASKS, weights={"digit": 1.0, "parity": 0.25})
    assert list(fixed.parameters()) == []
    assert torch.allclose(fixed(out, y), ce_d + 0.25 * ce_p, atol=1e-6)


def test_metrics_report_each_task_and_plain_loss_sum() -> None:
    m = build_metrics(
        type("I", (), {"task": "multitask", "tasks": TASKS})(), device=torch.device("cpu")
    )
    out = {"digit": torch.eye(10)[[1, 2, 3, 4]] * 5, "parity": torch.eye(2)[[1, 0, 0, 0]] * 5}
    y = torch.tensor([[1, 1], [2, 0], [9, 1], [4, 0]], dtype=torch.float32)
    m.update(out, y, loss_sum=torch.tensor(123.0), count=4)
    got = m.compute()
    assert got["digit/acc"] == 0.75 and got["parity/acc"] == 0.75
    ce = F.cross_entropy(out["digit"], y[:, 0].long()) + F.cross_entropy(
        out["parity"], y[:, 1].long()
    )
    assert got["loss"] == pytest.approx(ce.item(), rel=1e-6)  # not the weighted objective


def test_learned_weights_train_in_optimizer_and_checkpoint(make_cfg) -> None:
    cfg = make_cfg(
        *MT,
        "data.parity_noise=0.4",
        "data.batch_size=16",  # Adam moves each log-variance ~lr per step: give it steps
        "train.epochs=4",
        "optim.lr=0.005",
        "optim.weight_decay=0.1",
    )
    trainer = Trainer(cfg, verbose=False)
    group = next(g for g in trainer.optimizer.param_groups if g.get("name") == "loss")
    log_vars = trainer.loss_fn.combine.log_vars
    assert group["params"] == [log_vars] and group["weight_decay"] == 0.0
    result = trainer.fit()
    w = trainer.loss_fn.task_weights()
    assert not torch.equal(log_vars.detach().cpu(), torch.zeros(2))  # trained
    assert w["parity"] < w["digit"]  # the noisy task is weighted down
    assert result.test is not None and result.test["digit/acc"] > 0.85
    assert set(result.test) >= {"loss", "digit/acc", "parity/acc", "parity/f1_macro"}
    saved = load_checkpoint(resolve_checkpoint(trainer.run_dir))
    assert torch.equal(saved["loss"]["combine.log_vars"], log_vars.detach().cpu())
    (extra,) = saved["loss_optimizer"]
    assert extra["hyper"]["name"] == "loss" and "exp_avg" in extra["state"][0]


def test_resume_restores_log_vars_and_their_adam_state(make_cfg) -> None:
    over = (*MT, "data.parity_noise=0.3", "train.epochs=3")
    straight = Trainer(make_cfg(*over, "name=a"), verbose=False)
    straight.fit()

    class StopAt:
        def on_update_end(self, trainer: Trainer, step: int) -> None:
            if step == 30:
                trainer.request_stop("test", interrupt=True)

    first = Trainer(make_cfg(*over, "name=b"), callbacks=[StopAt()], verbose=False)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    resumed = Trainer(make_cfg(*over, f"resume={first.run_dir}"), verbose=False)
    resumed.fit()
    a = load_checkpoint(resolve_checkpoint(straight.run_dir))
    b = load_checkpoint(resolve_checkpoint(first.run_dir))
    assert torch.equal(a["loss"]["combine.log_vars"], b["loss"]["combine.log_vars"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["loss_optimizer"][0]["state"][0], b["loss_optimizer"][0]["state"][0]
    assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


def test_cli_trains_and_evaluates_the_shipped_config(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = run_kiln(
        "train",
        str(root / "configs/digits_multitask.yaml"),
        f"out_dir={tmp_path}",
        "train.epochs=2",
        "log.tensorboard=false",
    )
    assert done.returncode == 0, done.stderr
    assert "parity/acc" in done.stdout and "digit/acc" in done.stdout
    run = tmp_path / "digits_multitask"
    ev = run_kiln("eval", str(run))
    assert ev.returncode == 0, ev.stderr
    assert "digit/acc" in ev.stdout
    bad = run_kiln("export", str(run), "--format", "onnx")
    assert bad.returncode != 0
    assert "multi-task models" in bad.stderr and "Traceback" not in bad.stderr

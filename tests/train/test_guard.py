"""The non-finite guard alone: verdicts, skip, rollback and the stop error, without a Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.config import TrainConfig
from kiln.train import snapshots
from kiln.train.build import build_parts
from kiln.train.diagnosis import stop_error
from kiln.train.guard import NonFiniteError, rollback, skip, stop_message, verdict
from kiln.train.loop_state import LoopState


def test_stop_is_the_default_and_advises_both_other_policies() -> None:
    v = verdict(TrainConfig(), LoopState(), updates=3)
    assert v.action == "stop" and "train.nonfinite=skip|rollback" in v.advice


def test_skip_counts_a_streak_since_the_last_update_taken_then_stops() -> None:
    cfg = TrainConfig(nonfinite="skip", max_consecutive_skips=3)
    state = LoopState()
    actions = []
    for updates in (5, 5, 6, 6, 6):  # two bad in a row, one good update, then three bad
        v = verdict(cfg, state, updates)
        actions.append(v.action)
        state.skip_streak = v.streak
        if v.action == "skip":
            state.nonfinite_skipped += 1
    assert actions == ["skip", "skip", "skip", "skip", "stop"]
    assert state.skip_streak == (6, 3)
    assert "3 updates in a row were non-finite (4 skipped before)" in v.advice
    assert "skip|rollback" not in v.advice  # skip is what failed: advise what is left


def test_verdict_changes_nothing_it_is_given() -> None:
    state = LoopState(rollbacks=1, nonfinite_skipped=2, skip_streak=(4, 1))
    verdict(TrainConfig(nonfinite="skip"), state, 4)
    assert (state.rollbacks, state.nonfinite_skipped, state.skip_streak) == (1, 2, (4, 1))


def test_rollback_stops_after_max_rollbacks_with_what_is_left() -> None:
    cfg = TrainConfig(nonfinite="rollback", max_rollbacks=2, rollback_lr_factor=0.5)
    assert verdict(cfg, LoopState(rollbacks=1), 0).action == "rollback"
    v = verdict(cfg, LoopState(rollbacks=2), 0)
    assert v.action == "stop"
    assert "raise train.max_rollbacks (now 2)" in v.advice and "(now 0.5)" in v.advice
    assert "skip|rollback" not in v.advice


def test_stop_message_names_the_position_and_the_saved_file() -> None:
    s = LoopState(epoch=1, batch_in_epoch=3, step=7, rollbacks=2)
    msg = stop_message(s, where="in fc", saved=Path("step-7.ckpt"), advice="lower it")
    assert msg == (
        "non-finite loss or gradient at step 8 (epoch 2, batch 3) after 2 rollbacks: in fc; "
        "the weights before it are saved in step-7.ckpt. Lower optim.lr, lower it"
    )


@pytest.fixture
def parts(make_cfg):
    return build_parts(make_cfg("model.kwargs.hidden=[8]", "optim.name=sgd"), None, None)


def _nan_grads(parts) -> None:
    for p in parts.engine.model.parameters():
        p.grad = torch.full_like(p, float("nan"))


def test_skip_drops_the_gradients_and_passes_the_slot(parts) -> None:
    _nan_grads(parts)
    state = LoopState(step=4)
    skip(parts, state)
    assert (state.step, state.nonfinite_skipped) == (5, 1)
    assert all(p.grad is None for p in parts.engine.model.parameters())


def test_rollback_restores_the_checkpoint_and_returns_its_state(parts, make_cfg, tmp_path) -> None:
    cfg = make_cfg()
    model = parts.engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = parts.optimizer.param_groups[0]["lr"]
    saved = LoopState(epoch=0, batch_in_epoch=2, step=2, lr_scale=0.5, best={"step": 2})
    torch.save(snapshots.capture(parts, saved, cfg, tmp_path), tmp_path / "step-2.ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _nan_grads(parts)
    now = LoopState(epoch=0, batch_in_epoch=5, step=5, lr_scale=0.5, rollbacks=1)
    now.nonfinite_skipped, now.resumed_from = 3, [1]
    back = rollback(parts, now, tmp_path / "step-2.ckpt", factor=0.1)
    assert back is not now and (now.step, now.rollbacks) == (5, 1)  # the given state unchanged
    assert (back.step, back.batch_in_epoch, back.best) == (2, 2, {"step": 2})
    assert (back.rollbacks, back.nonfinite_skipped, back.resumed_from) == (2, 3, [1])
    assert back.lr_scale == pytest.approx(0.05)
    # The checkpoint's LRs count as x0.5 already: x0.05 overall is x0.1 of them.
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_rollback_without_a_checkpoint_says_so(parts) -> None:
    with pytest.raises(NonFiniteError, match="at step 4 with no checkpoint"):
        rollback(parts, LoopState(step=3), None, factor=0.5)


def test_stop_error_reads_the_bad_gradients_before_dropping_them(parts, tmp_path) -> None:
    _nan_grads(parts)
    x = torch.full((4, 64), float("nan"))
    err = stop_error(
        parts, LoopState(step=1), x, save=lambda: tmp_path / "step-1.ckpt", advice="try less"
    )
    msg = str(err)
    assert "the input batch itself holds NaN/Inf" in msg
    assert "non-finite gradients in 4 parameters" in msg and "step-1.ckpt" in msg
    assert all(p.grad is None for p in parts.engine.model.parameters())

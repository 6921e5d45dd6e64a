"""LoopState and StopRequest alone: the checkpoint's ``loop`` format, best tracking, stops."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.train.checkpoint import load_checkpoint
from kiln.train.loop_state import LoopState, StopRequest

OLD_CHECKPOINT = Path(__file__).parent / "fixtures/run_c4d26ef/checkpoints/step-9.ckpt"


def test_state_dict_has_the_keys_checkpoints_have_always_had() -> None:
    old = load_checkpoint(OLD_CHECKPOINT)["loop"]
    assert LoopState().state_dict().keys() == old.keys()
    state = LoopState.from_state(old)
    assert (state.epoch, state.batch_in_epoch, state.step) == (1, 4, 9)
    assert state.state_dict() == old


def test_round_trip_and_defaults_for_keys_added_later() -> None:
    s = LoopState(3, 7, 40, micro=4, lr_scale=0.25, rollbacks=2, nonfinite_skipped=5)
    s.skip_streak = (39, 2)
    saved = s.state_dict()
    assert saved == {
        "epoch": 3,
        "batch": 7,
        "step": 40,
        "micro": 4,
        "lr_scale": 0.25,
        "rollbacks": 2,
        "nonfinite_skipped": 5,
    }
    back = LoopState.from_state(saved, best={"step": 30, "val/loss": 0.1})
    assert back.state_dict() == saved
    assert back.best == {"step": 30, "val/loss": 0.1}
    assert back.skip_streak == (-1, 0)  # not saved: a resume starts a new streak
    oldest = LoopState.from_state({"epoch": 1, "batch": 0, "step": 12})
    assert (oldest.micro, oldest.lr_scale, oldest.rollbacks, oldest.nonfinite_skipped) == (
        1,
        1.0,
        0,
        0,
    )


def test_load_keeps_or_replaces_the_resume_history() -> None:
    s = LoopState(resumed_from=[4])
    s.load_state_dict({"epoch": 0, "batch": 2, "step": 2})
    assert s.resumed_from == [4]
    s.load_state_dict({"epoch": 0, "batch": 2, "step": 2}, resumed_from=[4, 8])
    assert s.resumed_from == [4, 8]


def test_record_best_follows_the_mode() -> None:
    s = LoopState(step=1)
    s.record_best("val/loss", None, "min")
    assert s.best == {}
    s.record_best("val/loss", 0.5, "min")
    s.step = 2
    s.record_best("val/loss", 0.7, "min")  # worse: kept
    assert s.best == {"step": 1, "val/loss": 0.5}
    s.record_best("val/loss", 0.5, "min")  # equal: not better
    assert s.best["step"] == 1
    s.step = 3
    s.record_best("val/loss", 0.4, "min")
    assert s.best == {"step": 3, "val/loss": 0.4}
    acc = LoopState(step=5, best={"step": 2, "val/acc": 0.8})
    acc.record_best("val/acc", 0.7, "max")
    assert acc.best["step"] == 2
    acc.record_best("val/acc", 0.9, "max")
    assert acc.best == {"step": 5, "val/acc": 0.9}


def test_stop_request_keeps_an_interrupt_and_agrees_alone() -> None:
    stop = StopRequest()
    assert not stop.agree(1, torch.device("cpu"))
    stop.request("SIGTERM", interrupt=True)
    stop.request("early stopping")  # a later plain stop does not cancel the interrupt
    assert (stop.reason, stop.interrupt) == ("early stopping", True)
    assert stop.agree(1, torch.device("cpu"))

"""Non-finite policies end to end: each stops, reports or refuses instead of ending quietly."""

from __future__ import annotations

import json

import pytest
import torch
from nan_models import NaNModel
from torch import nn

from kiln.errors import KilnError
from kiln.train import build
from kiln.train.checkpoint import load_checkpoint
from kiln.train.guard import NonFiniteError
from kiln.train.trainer import Trainer


def _trainer(make_cfg, model: nn.Module, *overrides: str, verbose: bool = False) -> Trainer:
    cfg = make_cfg(*overrides)
    return Trainer(cfg, model=model, data=build.build_data_for(cfg), verbose=verbose)


def test_skip_stops_after_max_consecutive_skips(make_cfg) -> None:
    trainer = _trainer(make_cfg, NaNModel(range(5, 10**6)), "train.nonfinite=skip")
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    msg = str(info.value)
    assert isinstance(info.value, KilnError)  # the CLI prints one line and exits 2
    assert "at step 14 " in msg and "10 updates in a row were non-finite" in msg
    assert "(9 skipped before)" in msg and "train.max_consecutive_skips (now 10)" in msg
    assert "nonfinite=skip|rollback" not in msg  # skip is what failed: advise what is left
    assert trainer.nonfinite_skipped == 9
    saved = load_checkpoint(trainer.ckpts.last())
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_skip_reports_skips_in_the_epoch_line_and_summary(make_cfg, capsys) -> None:
    bad = (3, 4, 5, 20, 30)  # never 3 in a row beyond the limit
    trainer = _trainer(
        make_cfg,
        NaNModel(bad),
        "train.nonfinite=skip",
        "train.max_consecutive_skips=4",
        verbose=True,
    )
    trainer.fit()
    assert trainer.nonfinite_skipped == 5
    assert "skipped 5 non-finite updates" in capsys.readouterr().out
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["skipped_updates"] == 5 and summary["rollbacks"] == 0


def test_nan_validation_loss_is_not_a_silent_success(make_cfg) -> None:
    trainer = _trainer(make_cfg, NaNModel(eval_nan=True), "train.nonfinite=skip")
    with pytest.raises(NonFiniteError, match=r"non-finite val loss \(nan\); 0 of \d+ updates"):
        trainer.fit()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    # No finite validation loss, so no best checkpoint: the file holds the final weights.
    assert summary["best_checkpoint"] is None
    assert summary["weights"] == "final weights"


def test_rollback_exhausted_advises_what_is_left(make_cfg) -> None:
    trainer = _trainer(
        make_cfg,
        NaNModel((3, 6, 9)),
        "train.nonfinite=rollback",
        "train.max_rollbacks=2",
    )
    with pytest.raises(NonFiniteError, match="after 2 rollbacks") as info:
        trainer.fit()
    msg = str(info.value)
    assert "skip|rollback" not in msg
    assert "raise train.max_rollbacks (now 2)" in msg and "train.nonfinite=skip" in msg


def test_ignore_never_writes_nonfinite_weights(make_cfg) -> None:
    trainer = _trainer(
        make_cfg,
        NaNModel((6,)),
        "train.nonfinite=ignore",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=100",
    )
    with pytest.raises(NonFiniteError, match=r"model\.safetensors was not written") as info:
        trainer.fit()
    msg = str(info.value)
    assert "train.nonfinite=ignore let non-finite updates through" in msg
    assert not (trainer.run_dir / "model.safetensors").exists()
    good = trainer.ckpts.dir / "step-4.ckpt"  # the update of call 6 is step 6
    assert f"the newest checkpoint with finite weights is {good}" in msg
    saved = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())

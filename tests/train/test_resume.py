"""Exact resume: stop mid-epoch, resume, and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from runners import popen_kiln, run_kiln

from kiln.config import Config
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.trainer import Trainer, TrainingInterrupted

RESUME_OVERRIDES = (
    "model.kwargs.dropout=0.3",  # consumes the torch RNG every step
    "scheduler.name=warmup_cosine",
    "scheduler.warmup_steps=5",
    "optim.name=adamw",
    "optim.weight_decay=0.01",
    "train.epochs=3",
    "train.log_every=7",
    "data.batch_size=50",
)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["loop"] == b["loop"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), (i, k)
    assert a["scheduler"] == b["scheduler"]


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_update_end(self, trainer: Trainer, step: int) -> None:
        if step == self.step:
            trainer.request_stop("test", interrupt=True)


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(resolve_checkpoint(run_dir))


def test_resume_mid_epoch_is_bit_identical(make_cfg, tmp_path: Path) -> None:
    cfg: Config = make_cfg(*RESUME_OVERRIDES, "name=straight")
    straight = Trainer(cfg, verbose=False)
    n_batches = straight.n_batches
    straight.fit()
    stop_at = n_batches + n_batches // 2  # the middle of epoch 2
    assert stop_at % n_batches > 0

    first = Trainer(
        make_cfg(*RESUME_OVERRIDES, "name=split"), callbacks=[StopAt(stop_at)], verbose=False
    )
    with pytest.raises(TrainingInterrupted) as info:
        first.fit()
    saved = load_checkpoint(info.value.checkpoint)
    loop = {k: saved["loop"][k] for k in ("epoch", "batch", "step")}
    assert loop == {"epoch": 1, "batch": n_batches // 2, "step": stop_at}

    resumed = Trainer(make_cfg(*RESUME_OVERRIDES, f"resume={first.run_dir}"), verbose=False)
    assert resumed.run_dir == first.run_dir and resumed.step == stop_at
    resumed.fit()
    _assert_same_state(_final_state(straight.run_dir), _final_state(first.run_dir))


def test_resume_with_accumulation_and_partial_groups(make_cfg) -> None:
    over = (*RESUME_OVERRIDES, "train.accumulate=3", "data.batch_size=40")
    straight = Trainer(make_cfg(*over, "name=a"), verbose=False)
    straight.fit()
    stop = straight.updates_per_epoch + 2
    first = Trainer(make_cfg(*over, "name=b"), callbacks=[StopAt(stop)], verbose=False)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    Trainer(make_cfg(*over, f"resume={first.run_dir}"), verbose=False).fit()
    _assert_same_state(_final_state(straight.run_dir), _final_state(first.run_dir))


def _cli_cfg(tmp_path: Path, name: str) -> list[str]:
    return [
        "train",
        "model.name=mlp",
        "model.kwargs.hidden=[256,256]",
        "model.kwargs.dropout=0.2",
        "data.name=synthetic",
        "data.synthetic.n_samples=1500",
        "data.synthetic.n_features=32",
        "data.synthetic.n_classes=4",
        "scheduler.name=cosine",
        "train.epochs=12",
        "data.batch_size=32",
        "checkpoint.every_n_steps=13",
        "checkpoint.keep_last=3",
        "log.tensorboard=false",
        f"out_dir={tmp_path}",
        f"name={name}",
    ]


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "checkpoints" / "last").exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the first checkpoint: rc={proc.returncode}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_cli_killed_mid_epoch_resumes_bit_identical(tmp_path: Path, sig: signal.Signals) -> None:
    ref = run_kiln(*_cli_cfg(tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr

    proc = popen_kiln(*_cli_cfg(tmp_path, "killed"))
    run_dir = tmp_path / "killed"
    try:
        _wait_for_checkpoint(proc, run_dir)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "stopped by SIGTERM" in err and "resume with" in err
    stopped = load_checkpoint(resolve_checkpoint(run_dir))
    ref_state = load_checkpoint(resolve_checkpoint(tmp_path / "ref"))
    assert stopped["loop"]["step"] < ref_state["loop"]["step"]  # it really stopped early
    assert not (run_dir / "model.safetensors").exists()

    resumed = run_kiln(*_cli_cfg(tmp_path, "killed"), f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(ref_state, load_checkpoint(resolve_checkpoint(run_dir)))

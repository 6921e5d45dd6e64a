"""Exact resume: stop mid-epoch, resume, and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from resume_checks import assert_resumed_once_at, records, tree_digest
from runners import popen_kiln, run_kiln
from safetensors.torch import load_file

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

    # hyper-parameters too: the LR the next update would use (betas may come back as a list)
    def hyper(groups: list[dict]) -> list[dict]:
        return [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
            for g in groups
        ]

    assert hyper(a["optimizer"]["param_groups"]) == hyper(b["optimizer"]["param_groups"])
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
        "train.log_every=1",  # one record per update: the resumed process's updates are counted
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
    # It continued from the checkpoint (a restart from step 0 would end with the same weights).
    assert_resumed_once_at(run_dir, stopped["loop"]["step"], ref_state["loop"]["step"])


def _train_log(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, lr, loss) of every update record, without the records a resume repeats."""
    seen: dict[int, tuple[int, float, float]] = {}
    for r in records(run_dir):
        if "train/loss" in r:
            seen[r["step"]] = (r["step"], r["lr"], r["train/loss"])
    return sorted(seen.values())


EVERY_TECHNIQUE = (
    "model.name=resnet",
    "model.kwargs={width: 4, depths: [1, 1]}",
    "data.layout=image",
    "data.image_size=8",
    "model.drop_path=0.2",
    "mix.mixup_alpha=0.4",
    "mix.cutmix_alpha=1.0",
    "mix.prob=0.8",
    "ema.enabled=true",
    "swa.enabled=true",
    "swa.start_epoch=1",
    "freeze.modules=[stem]",
    "freeze.unfreeze_at={1: [stem]}",
    "scheduler.name=warmup_cosine",  # per-update LR: SWALR must win it back on resume
    "train.epochs=3",
    "train.log_every=1",
    "data.batch_size=100",
)


def test_resume_with_every_technique_after_swa_averaged_is_bit_identical(make_cfg) -> None:
    straight = Trainer(make_cfg(*EVERY_TECHNIQUE, "name=straight"), verbose=False)
    n = straight.n_batches
    straight.fit()
    cut = 2 * n + n // 2  # the last epoch: SWA has averaged epoch 2 and SWALR owns the LR
    first = Trainer(make_cfg(*EVERY_TECHNIQUE, "name=cut"), callbacks=[StopAt(cut)], verbose=False)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    saved = load_checkpoint(resolve_checkpoint(first.run_dir))
    assert saved["techniques"]["swa"]["averaged"]["n_averaged"] == 1  # cut after averaging
    resumed = Trainer(make_cfg(*EVERY_TECHNIQUE, f"resume={first.run_dir}"), verbose=False)
    resumed.fit()

    a, b = _final_state(straight.run_dir), _final_state(first.run_dir)
    _assert_same_state(a, b)
    ta, tb = a["techniques"], b["techniques"]
    assert torch.equal(ta["mixer"]["generator"], tb["mixer"]["generator"])
    for k, v in ta["ema"]["shadow"].items():
        assert torch.equal(v, tb["ema"]["shadow"][k]), k
    for k, v in ta["swa"]["averaged"].items():
        assert torch.equal(v, tb["swa"]["averaged"][k]), k  # includes n_averaged
    assert ta["swa"]["scheduler"] == tb["swa"]["scheduler"]
    wa = load_file(straight.run_dir / "model.safetensors")
    wb = load_file(first.run_dir / "model.safetensors")
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k
    log_a, log_b = _train_log(straight.run_dir), _train_log(first.run_dir)
    assert log_b == log_a  # every update's LR and loss, before and after the cut
    assert {lr for _, lr, _ in log_a[cut:]} == {0.0001}  # SWALR's LR (swa.lr = optim.lr / 10)
    mark = assert_resumed_once_at(first.run_dir, cut, 3 * n)
    assert (mark["epoch"], mark["batch"]) == (2, n // 2)


def _finish(make_cfg, *over: str) -> Path:
    run = Trainer(make_cfg(*over), verbose=False)
    run.fit()
    return run.run_dir


def test_resuming_a_finished_run_changes_nothing(make_cfg, capsys) -> None:
    run = _finish(make_cfg, "name=done", "train.log_every=1")
    before = tree_digest(run)
    capsys.readouterr()
    again = Trainer(make_cfg("name=done", "train.log_every=1", f"resume={run}"))
    result = again.fit()
    out = capsys.readouterr().out
    assert "already complete" in out and "train.epochs=N (N > 2)" in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert tree_digest(run) == before  # no config.yaml rewrite, no duplicate test line
    summary = json.loads((run / "summary.json").read_text())
    assert result.steps == summary["steps"] and result.test == summary["test"]

    more = ("name=done", "train.log_every=1", "train.epochs=3", f"resume={run}")
    longer = Trainer(make_cfg(*more), verbose=False)
    assert longer.complete is None  # a larger train.epochs extends it
    longer.fit()
    assert_resumed_once_at(run, summary["steps"], 3 * longer.updates_per_epoch)


def test_resuming_an_early_stopped_run_changes_nothing(make_cfg, capsys) -> None:
    over = ("early_stop.enabled=true", "early_stop.patience=1", "early_stop.min_delta=10")
    run = _finish(make_cfg, *over, "train.epochs=6", "name=early")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] and summary["steps"] < 6 * 10  # stopped after epoch 2
    before = tree_digest(run)
    capsys.readouterr()
    for _ in range(2):  # each resume used to train one more epoch
        Trainer(make_cfg(*over, "train.epochs=6", f"resume={run}")).fit()
        out = capsys.readouterr().out
        assert "already stopped early" in out and "nothing to do" in out, out
        assert len(out.strip().splitlines()) == 1, out
    assert tree_digest(run) == before


def test_cli_resume_of_a_finished_run_exits_0_and_says_so(tmp_path: Path) -> None:
    args = ("train", "model.name=mlp", "model.kwargs.hidden=[8]", "train.epochs=1")
    args += ("log.tensorboard=false", f"out_dir={tmp_path}", "name=r")
    assert run_kiln(*args).returncode == 0
    before = tree_digest(tmp_path / "r")
    again = run_kiln(*args, f"resume={tmp_path / 'r'}")
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout and "nothing to do" in again.stdout
    assert tree_digest(tmp_path / "r") == before

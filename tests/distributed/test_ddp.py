"""DDP and FSDP2 through torchrun on CPU/gloo: same results as one process, resumable across
world sizes, multi-node and elastic restarts. Every launch has a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from resume_checks import assert_resumed_once_at, records
from runners import run_kiln

from conftest import SCRIPTS, finish_group, free_port, run_group, start_group, torchrun_cmd
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BASE = (
    "model.name=mlp",
    "model.kwargs={hidden: [32]}",
    "data.name=synthetic",
    "data.synthetic.n_samples=1000",  # 700 train rows: 14 batches of 50, 25 per rank
    "data.synthetic.n_features=12",
    "data.synthetic.n_classes=3",
    "data.batch_size=50",
    "optim.name=sgd",
    "optim.lr=0.05",
    "train.epochs=2",
    "log.tensorboard=false",
    "checkpoint.keep_last=5",
)


def _args(tmp: Path, name: str, *more: str) -> list[str]:
    return ["train", *BASE, f"out_dir={tmp}", f"name={name}", *more]


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    from kiln.train.checkpoint.weights import consolidate_checkpoint

    return consolidate_checkpoint(resolve_checkpoint(run))


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_gradients_equal_single_process_and_no_sync_skips_allreduce(torchrun) -> None:
    proc = torchrun(2, str(SCRIPTS / "ddp_grads.py"))
    _ok(proc)
    assert "DDP-GRADS-OK" in proc.stdout


@pytest.mark.parametrize(
    "extra", [("strategy=ddp",), ("strategy=ddp", "train.accumulate=2"), ("strategy=fsdp",)]
)
def test_two_ranks_equal_one_process(torchrun, tmp_path: Path, extra: tuple[str, ...]) -> None:
    common = [e for e in extra if not e.startswith("strategy")]
    _ok(run_kiln(*_args(tmp_path, "single", *common)))
    proc = torchrun(2, "-m", "kiln", *_args(tmp_path, "multi", *extra))
    _ok(proc)
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports
    a, b = _last_weights(tmp_path / "single"), _last_weights(tmp_path / "multi")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if "strategy=fsdp" in extra:
        assert list((tmp_path / "multi" / "checkpoints").glob("step-*.dcp/*.distcp"))
        out = tmp_path / "consolidated.safetensors"
        _ok(run_kiln("consolidate", str(tmp_path / "multi"), f"--out={out}"))
        import kiln

        torch.testing.assert_close(kiln.load_model(out).state_dict(), b)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((2, "strategy=ddp"), (1, "strategy=single")),
        ((1, "strategy=single"), (2, "strategy=ddp")),
        ((2, "strategy=fsdp"), (1, "strategy=single")),
        ((1, "strategy=single"), (2, "strategy=fsdp")),
    ],
    ids=["ddp2-to-1", "1-to-ddp2", "fsdp2-to-1", "1-to-fsdp2"],
)
def test_resume_across_world_sizes(torchrun, tmp_path: Path, first, second) -> None:
    _ok(run_kiln(*_args(tmp_path, "straight")))

    def launch(nproc: int, *args: str) -> None:
        _ok(torchrun(nproc, "-m", "kiln", *args) if nproc > 1 else run_kiln(*args))

    every = "train.log_every=1"  # one record per update: the resumed process's are counted
    launch(first[0], *_args(tmp_path, "split", first[1], every, "train.max_steps=9"))  # epoch 1
    state = load_checkpoint(resolve_checkpoint(tmp_path / "split"))
    assert state["loop"]["step"] == 9 and state["world_size"] == first[0]
    # max_steps=null: the run's own config (read on resume) stops at 9; train on to the end
    to_end = ("train.max_steps=null", f"resume={tmp_path / 'split'}")
    launch(second[0], *_args(tmp_path, "split", second[1], every, *to_end))
    # It continued from step 9 with the new world size (a restart from 0 ends the same).
    total = load_checkpoint(resolve_checkpoint(tmp_path / "straight"))["loop"]["step"]
    mark = assert_resumed_once_at(tmp_path / "split", 9, total)
    assert mark["world_size"] == second[0] and not mark["elastic"]
    torch.testing.assert_close(
        _last_weights(tmp_path / "split"),
        _last_weights(tmp_path / "straight"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_two_nodes_on_localhost(tmp_path: Path) -> None:
    port = free_port()
    cmds = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=kiln-test",
            "-m",
            "kiln",
            *_args(tmp_path, "nodes", "strategy=ddp"),
        ]
        for rank in range(2)
    ]
    procs = [start_group(c) for c in cmds]
    done = [finish_group(p, timeout=240) for p in procs]
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    assert sum(d.stdout.count("run directory:") for d in done) == 1
    _ok(run_kiln(*_args(tmp_path, "single")))
    torch.testing.assert_close(
        _last_weights(tmp_path / "nodes"), _last_weights(tmp_path / "single"), rtol=1e-5, atol=1e-6
    )


def test_elastic_restart_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL one worker after the first checkpoint; torchrun restarts the group, which resumes.

    Guaranteed: the restarted group continues from the last checkpoint and, because resume is
    exact (same world size, every rank's RNG restored), ends with the weights of an uninterrupted
    run. Not guaranteed: which step the kill lands on (work after the checkpoint is redone).
    """
    more = (
        "strategy=ddp",
        "train.epochs=6",
        "checkpoint.every_n_steps=4",
        "model.kwargs={hidden: [256, 256]}",
        "train.log_every=1",  # one record per update: the restarted group's are counted
    )
    cmd = torchrun_cmd(
        2, "-m", "kiln", *_args(tmp_path, "elastic", *more), extra=("--max-restarts=2",)
    )
    proc = start_group(cmd)
    last = tmp_path / "elastic" / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    workers = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "kiln" in " ".join(c.cmdline())
    ]
    assert workers and proc.poll() is None, "the run ended before the kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    done = finish_group(proc, timeout=240)
    err = done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err  # the killed worker; torchrun then restarted the group
    assert not list(tmp_path.glob("elastic-*")), "the restarted group must reuse its run dir"
    _ok(run_kiln(*_args(tmp_path, "ref", *more)))
    torch.testing.assert_close(
        _last_weights(tmp_path / "elastic"), _last_weights(tmp_path / "ref"), rtol=1e-5, atol=1e-6
    )
    # The same weights also come from a restart at step 0: check the group resumed, at a
    # checkpoint's step, and did only the updates after it.
    marks = [r for r in records(tmp_path / "elastic") if r.get("event") == "resumed"]
    assert len(marks) == 1 and marks[0]["elastic"], marks
    start = marks[0]["step"]
    assert start > 0 and start % 4 == 0, start
    total = load_checkpoint(resolve_checkpoint(tmp_path / "ref"))["loop"]["step"]
    assert_resumed_once_at(tmp_path / "elastic", start, total)


def test_sigterm_under_torchrun_stops_all_ranks_at_one_step(tmp_path: Path) -> None:
    more = (
        "strategy=ddp",
        "train.epochs=8",
        "checkpoint.every_n_steps=5",
        "model.kwargs={hidden: [256, 256]}",
        "train.log_every=1",  # one record per update: the resumed group's are counted
    )
    proc = start_group(torchrun_cmd(2, "-m", "kiln", *_args(tmp_path, "term", *more)))
    last = tmp_path / "term" / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "kiln" in " ".join(child.cmdline()):
            child.send_signal(signal.SIGTERM)  # what a scheduler's preemption does to each worker
    err = finish_group(proc, timeout=120).stderr
    assert "stopped by SIGTERM" in err
    stopped = load_checkpoint(resolve_checkpoint(tmp_path / "term"))
    assert stopped["loop"]["step"] < 8 * 7  # it stopped early, with one agreed checkpoint
    resumed = run_group(
        torchrun_cmd(
            2, "-m", "kiln", *_args(tmp_path, "term", *more, f"resume={tmp_path / 'term'}")
        ),
        timeout=240,
    )
    _ok(resumed)
    _ok(run_kiln(*_args(tmp_path, "ref", *more)))
    torch.testing.assert_close(
        _last_weights(tmp_path / "term"), _last_weights(tmp_path / "ref"), rtol=1e-5, atol=1e-6
    )
    total = load_checkpoint(resolve_checkpoint(tmp_path / "ref"))["loop"]["step"]
    assert_resumed_once_at(tmp_path / "term", stopped["loop"]["step"], total)

"""Checkpoint files and the ``checkpoints/`` folder, without a Trainer.

* rotation: keep the last N, keep the best N by a metric (min or max), ``last``/``best``
  pointers, ``index.json`` carried over to the next process;
* atomic writes: a write that dies half-way (an exception, or the process killed) leaves the
  previous file whole; the data is fsynced before the rename and the folder after it;
* loading with ``weights_only=True``: a file holding anything but plain state (an object of a
  user's class, a pickle that would call a function) is refused and nothing runs.

Disk-full handling is in ``tests/security/test_checkpoint_writes.py``; damaged and forged files
in ``tests/security/test_malformed_files.py``.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.errors import UsageError
from kiln.train.checkpoint import (
    CheckpointManager,
    UnsafeCheckpointError,
    atomic_write,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.ckpt"))


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _state(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((3,), value)}}


def _w(path: Path) -> list[float]:
    return load_checkpoint(path)["model"]["w"].tolist()


# ---------------------------------------------------------------- rotation and pointers


def test_keep_last_removes_older_files_and_moves_the_last_pointer(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=0)
    for step in range(1, 6):
        m.save(_state(step), step=step)
        assert (tmp_path / "last").read_text() == f"step-{step}.ckpt"
    assert _files(tmp_path) == ["step-4.ckpt", "step-5.ckpt"]
    assert m.last() == tmp_path / "step-5.ckpt"
    assert _w(resolve_checkpoint(tmp_path)) == [5.0] * 3
    assert not (tmp_path / "best").exists()  # no metric, no best
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {"saved": ["step-4.ckpt", "step-5.ckpt"], "scores": {}}


@pytest.mark.parametrize(
    ("mode", "metrics"),
    [
        ("max", [0.5, 0.9, 0.6, 0.8, 0.1]),  # accuracy
        ("min", [0.5, 0.1, 0.4, 0.2, 0.9]),  # loss
    ],
)
def test_keep_best_keeps_the_best_outside_the_last_window(
    tmp_path: Path, mode: str, metrics: list[float]
) -> None:
    m = CheckpointManager(tmp_path, keep_last=1, keep_best=2, mode=mode)
    for step, metric in enumerate(metrics, 1):
        m.save(_state(step), step=step, metric=metric)
    # the last one, plus the two best (steps 2 and 4) although they are older
    assert _files(tmp_path) == ["step-2.ckpt", "step-4.ckpt", "step-5.ckpt"]
    assert m.best_name() == "step-2.ckpt"
    assert (tmp_path / "best").read_text() == "step-2.ckpt"
    assert _w(resolve_checkpoint(tmp_path / "best")) == [2.0] * 3
    assert _w(resolve_checkpoint(tmp_path)) == [5.0] * 3


@pytest.mark.parametrize(("keep_last", "keep_best"), [(0, 1), (-1, 1), (2, -1)])
def test_keep_counts_that_would_keep_everything_or_nothing_are_refused(
    tmp_path: Path, keep_last: int, keep_best: int
) -> None:
    # keep_last=0 used to keep every file: saved[-0:] is the whole list.
    with pytest.raises(UsageError, match="keep_last must be >= 1 and keep_best >= 0"):
        CheckpointManager(tmp_path, keep_last=keep_last, keep_best=keep_best)


def test_keep_last_and_one_best(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, mode="max")
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.65)]:
        m.save({"step": step}, step=step, metric=acc)
    assert _files(tmp_path) == ["step-2.ckpt", "step-4.ckpt", "step-5.ckpt"]
    assert resolve_checkpoint(tmp_path).name == "step-5.ckpt"
    assert (tmp_path / "best").read_text() == "step-2.ckpt"
    assert load_checkpoint(resolve_checkpoint(tmp_path / "best"))["step"] == 2


def test_the_best_pointer_moves_only_to_a_better_checkpoint(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=1, keep_best=1, mode="min")
    m.save(_state(1), step=1, metric=0.5)
    m.save(_state(2), step=2, metric=0.7)  # worse: best stays on step 1, which is kept
    assert (tmp_path / "best").read_text() == "step-1.ckpt"
    assert _files(tmp_path) == ["step-1.ckpt", "step-2.ckpt"]
    m.save(_state(3), step=3, metric=0.2)  # better: step 1 is neither last nor best any more
    assert (tmp_path / "best").read_text() == "step-3.ckpt"
    assert _files(tmp_path) == ["step-3.ckpt"]


@pytest.mark.parametrize(
    ("mode", "bad"), [("min", float("nan")), ("max", float("nan")), ("max", float("inf"))]
)
def test_a_non_finite_metric_never_becomes_the_best(tmp_path: Path, mode: str, bad: float) -> None:
    m = CheckpointManager(tmp_path, keep_last=1, keep_best=1, mode=mode)
    m.save(_state(1), step=1, metric=bad)
    m.save(_state(2), step=2, metric=0.5)
    assert m.best_name() == "step-2.ckpt"
    assert (tmp_path / "best").read_text() == "step-2.ckpt"
    assert _files(tmp_path) == ["step-2.ckpt"]


def test_saving_a_step_again_replaces_it_and_makes_it_last(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=3, keep_best=0)
    m.save(_state(3), step=3)
    m.save(_state(4), step=4)
    m.save(_state(30), step=3)  # after a rollback to step 3
    assert m.index["saved"] == ["step-4.ckpt", "step-3.ckpt"]
    assert resolve_checkpoint(tmp_path).name == "step-3.ckpt"
    assert _w(tmp_path / "step-3.ckpt") == [30.0] * 3


def test_a_new_manager_continues_the_rotation_of_the_folder(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_last=2, keep_best=1)
    first.save(_state(1), step=1, metric=0.1)
    first.save(_state(2), step=2, metric=0.5)
    resumed = CheckpointManager(tmp_path, keep_last=2, keep_best=1)  # the next process
    resumed.save(_state(3), step=3, metric=0.6)
    resumed.save(_state(4), step=4, metric=0.7)
    # step 2 (neither last two nor best) is removed though the first process wrote it
    assert _files(tmp_path) == ["step-1.ckpt", "step-3.ckpt", "step-4.ckpt"]
    assert (tmp_path / "best").read_text() == "step-1.ckpt"


def test_mode_must_be_min_or_max(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'best'"):
        CheckpointManager(tmp_path, mode="best")


def test_without_a_pointer_the_highest_step_wins_by_number(tmp_path: Path) -> None:
    for step in (9, 10, 2):
        save_checkpoint(tmp_path / f"step-{step}.ckpt", _state(step))
    assert resolve_checkpoint(tmp_path).name == "step-10.ckpt"  # not "step-9" (text order)


# ---------------------------------------------------------------- atomic writes


def test_an_exception_mid_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "step-1.ckpt"
    save_checkpoint(path, _state(1.0))

    def dies_half_way(obj: object, f, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C during the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert _w(path) == [1.0] * 3
    assert _temps(tmp_path) == []


def test_a_killed_writer_leaves_the_old_file_and_an_orphan_that_is_cleaned(
    tmp_path: Path,
) -> None:
    path = tmp_path / "step-1.ckpt"
    save_checkpoint(path, _state(1.0))
    before = path.read_bytes()
    child = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from kiln.train.checkpoint import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'PK\\x03\\x04 half a checkpoint')\n"
        "    f.flush()\n"
        "    os._exit(9)  # killed: no finally, no clean-up\n"
        "atomic_write(Path(sys.argv[1]), write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(path)])
    assert proc.wait(timeout=120) == 9
    assert path.read_bytes() == before
    assert _temps(tmp_path) == [f".step-1.ckpt.tmp-{proc.pid}"]
    CheckpointManager(tmp_path)  # the next run removes the dead writer's temp file
    assert _temps(tmp_path) == []
    assert _w(path) == [1.0] * 3


def test_the_data_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "pointer", lambda f: f.write(b"step-1.ckpt"))
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "pointer").read_bytes() == b"step-1.ckpt"


# ---------------------------------------------------------------- weights_only loading


class UserThing:
    """A user's class: a pickle of it names ``test_checkpoint_manager.UserThing``."""

    def __init__(self) -> None:
        self.value = 3


class MakesFolder:
    """Unpickling it would call ``os.mkdir(path)``: the shape of a pickle that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def test_plain_training_state_loads(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "loop": {"epoch": 1, "batch": 2, "step": 3},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "config": {"name": "run", "lr": 0.1, "layers": [1, 2], "on": True, "none": None},
    }
    path = save_checkpoint(tmp_path / "step-3.ckpt", state)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"], state["model"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert loaded["config"] == state["config"] and loaded["loop"] == state["loop"]


def test_an_object_of_an_unknown_class_is_refused_and_named(tmp_path: Path) -> None:
    path = tmp_path / "step-1.ckpt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": UserThing()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "UserThing" in msg and "weights_only=True" in msg and str(path) in msg


def test_a_pickle_that_would_call_a_function_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "step-1.ckpt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": MakesFolder(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="mkdir"):
        load_checkpoint(path)
    assert not marker.exists()

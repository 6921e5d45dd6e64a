"""Writing checkpoints when the disk fails: one line, the previous checkpoint intact, no orphans.

A full disk is simulated (``torch.save`` or the file write raising ``ENOSPC``, and torch's own
``[enforce fail at inline_container.cc]`` text), never produced by filling a real disk.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.errors import DiskError
from kiln.train.checkpoint import (
    RESUME_KEYS,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    resolve_checkpoint,
)
from kiln.train.checkpoint import files as ckpt_mod

TORCH_FULL = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _failing_save(exc: BaseException):
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file first
        raise exc

    return save


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(TORCH_FULL)],
    ids=["ENOSPC", "torch-enforce-text"],
)
def test_disk_full_keeps_the_previous_checkpoint(
    exc: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save({"model": {"w": torch.ones(3)}}, step=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(exc))
    with pytest.raises(DiskError) as info:
        mgr.save({"model": {"w": torch.zeros(3)}}, step=2)
    msg = str(info.value)
    assert "disk is full" in msg and f"previous checkpoint {first} is intact" in msg
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp file left, no pointer moved, step-1 byte for byte
    assert load_checkpoint(resolve_checkpoint(tmp_path))["model"]["w"].tolist() == [1.0] * 3


def test_other_runtime_errors_are_not_called_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(RuntimeError("some bug")))
    with pytest.raises(RuntimeError, match="some bug") as info:
        CheckpointManager(tmp_path).save({"model": {}}, step=1)
    assert not isinstance(info.value, DiskError)
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_one_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path, *args, **kwargs):  # root ignores chmod: simulate what a user would see
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ckpt_mod, "open", refuse, raising=False)
    with pytest.raises(DiskError, match=r"cannot write .*Permission denied.*out_dir="):
        CheckpointManager(tmp_path).save({"model": {}}, step=1)


def test_orphan_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead, alive = (
        _dead_pid(),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]),
    )
    try:
        orphans = [tmp_path / f".step-5.ckpt.tmp-{dead}", tmp_path / f".last.tmp-{dead}"]
        live = tmp_path / f".step-6.ckpt.tmp-{alive.pid}"
        kept = [live, tmp_path / "notes.tmp-1", tmp_path / "step-4.ckpt"]
        for p in [*orphans, *kept]:
            p.write_bytes(b"partial")
        CheckpointManager(tmp_path)
        assert [p.exists() for p in orphans] == [False, False]
        assert all(p.exists() for p in kept)
    finally:
        alive.kill()
        alive.wait()


def test_kill_during_the_first_checkpoint_says_nothing_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli.main import app

    run = tmp_path / "runs" / "digits_mlp"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: digits_mlp\n")
    (run / "checkpoints" / f".step-10.ckpt.tmp-{_dead_pid()}").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resolve_checkpoint(run)
    with pytest.raises(SystemExit) as info:
        app(["train", "configs/digits_mlp.yaml", f"resume={run}"], standalone_mode=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "nothing to resume" in err[0], err


def test_disk_full_during_training_is_one_line_and_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli.main import app

    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(getattr(f, "name", ""))
        if len(calls) > 1:
            raise RuntimeError(TORCH_FULL)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = [
        "train",
        "configs/digits_mlp.yaml",
        f"out_dir={tmp_path}",
        "train.epochs=2",
        "model.kwargs.hidden=[8]",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    with pytest.raises(SystemExit) as info:
        app(args, standalone_mode=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert "disk is full" in err[0] and "is intact" in err[0], err
    monkeypatch.undo()
    folder = tmp_path / "digits_mlp" / "checkpoints"
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    saved = load_checkpoint(resolve_checkpoint(folder.parent), require=RESUME_KEYS)
    assert saved["loop"]["epoch"] >= 0


def test_disk_full_writing_model_safetensors_is_one_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from kiln.config import load_config
    from kiln.data.base import DataInfo
    from kiln.train.checkpoint.weights import save_weights

    def full(model, filename, metadata=None, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    cfg = load_config("configs/digits_mlp.yaml", [f"out_dir={tmp_path}"])
    info = DataInfo(task="classification", input_shape=(64,), num_classes=10)
    with pytest.raises(DiskError, match=r"disk is full .*kiln consolidate"):
        save_weights(torch.nn.Linear(64, 10), tmp_path / "model.safetensors", cfg, info)
    assert list(tmp_path.iterdir()) == []  # the partial temp file is gone

"""What a checkpoint holds (kiln.train.checkpoint.schema): format version, keys, errors.

A checkpoint written by a newer Kiln in a format this one does not know is refused with a
message naming the version that wrote it; a checkpoint written before versioning (no
``format_version``) still loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.train.checkpoint import (
    FORMAT_VERSION,
    RESUME_KEYS,
    CheckpointError,
    CorruptCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from kiln.train.checkpoint.schema import check_keys, check_version, plain_name, stamp


def _resumable() -> dict[str, object]:
    return {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {}, "param_groups": []},
        "config": {},
        "engine": {},
        "rng": [],
        "loop": {"epoch": 1, "batch": 0, "step": 4},
    }


def test_stamp_adds_the_format_and_the_writer_without_changing_the_input() -> None:
    state = {"model": {}}
    stamped = stamp(state)
    assert stamped == {
        "model": {},
        "format_version": FORMAT_VERSION,
        "kiln_version": kiln.__version__,
    }
    assert state == {"model": {}}


def test_a_saved_checkpoint_carries_its_format_version(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "step-4.ckpt", _resumable())
    raw = torch.load(path, weights_only=True)  # what is on disk, past every Kiln check
    assert raw["format_version"] == FORMAT_VERSION >= 1
    assert raw["kiln_version"] == kiln.__version__
    assert load_checkpoint(path, require=RESUME_KEYS)["loop"]["step"] == 4


def test_a_checkpoint_from_before_versioning_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "step-4.ckpt"
    torch.save(_resumable(), path)  # as Kiln wrote them before format_version existed
    assert load_checkpoint(path, require=RESUME_KEYS)["loop"]["step"] == 4


def test_a_checkpoint_from_a_newer_format_is_refused_naming_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "step-4.ckpt"
    # A future layout may lack today's keys: the version is what the message must name.
    future = {"weights": {}, "format_version": FORMAT_VERSION + 1, "kiln_version": "9.1.0"}
    torch.save(future, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, require=RESUME_KEYS)
    message = str(info.value)
    assert f"written by Kiln 9.1.0 in checkpoint format {FORMAT_VERSION + 1}" in message
    assert f"reads formats up to {FORMAT_VERSION}" in message and "upgrade Kiln" in message
    assert str(path) in message
    assert isinstance(info.value, KilnError)  # the CLI prints it as one line, exit 2


def test_a_newer_format_without_a_writer_is_still_named() -> None:
    with pytest.raises(CheckpointError, match=r"a newer Kiln in checkpoint format 7"):
        check_version("x.ckpt", {"format_version": 7})


@pytest.mark.parametrize("version", ["1", 1.0, -1, True, None])
def test_a_format_version_that_is_no_format_number_is_corrupt(version: object) -> None:
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        check_version("x.ckpt", {"format_version": version})


def test_this_format_and_older_ones_pass() -> None:
    for version in range(FORMAT_VERSION + 1):
        check_version("x.ckpt", {"format_version": version})
    check_version("x.ckpt", {})


def test_check_keys_names_what_is_missing_and_what_is_mistyped() -> None:
    state = _resumable()
    del state["optimizer"], state["engine"]
    with pytest.raises(CorruptCheckpointError, match="it lacks 'engine', 'optimizer'; fix"):
        check_keys(Path("x.ckpt"), state, RESUME_KEYS, "; fix")
    state = {**_resumable(), "rng": 3, "loop": {"epoch": 1, "batch": "0", "step": 4}}
    with pytest.raises(CorruptCheckpointError, match=r"loop \(epoch, batch, step\), rng do not"):
        check_keys(Path("x.ckpt"), state, RESUME_KEYS, "")


def test_a_sharded_checkpoint_needs_no_model_or_optimizer() -> None:
    state = {k: v for k, v in _resumable().items() if k not in ("model", "optimizer")}
    check_keys(Path("x.ckpt"), {**state, "sharded": "step-4.dcp"}, RESUME_KEYS, "")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("step-1.ckpt", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("a\\b", False),
    ],
)
def test_plain_name(name: str, ok: bool) -> None:
    assert plain_name(name) is ok

"""Malformed and hostile weights/checkpoint files: one line, exit 2, nothing run, nothing changed.

One tiny run is trained per module; each case copies it, damages one file, hashes every file of
the copy, runs one verb (the CLI in this process, so the table stays fast; a few cases also run
the real ``kiln`` subprocess) and checks: exit 2, exactly one stderr line ``error: ...`` with the
expected words, no ``Traceback``, the same hashes after, and a bounded time.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import struct
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from runners import run_kiln

from kiln.errors import KilnError

SECONDS = 60  # per case; each takes a second or two
BOMB_ELEMENTS = 20_000_000  # 80 MB of float32 zeros, deflated to about 80 KB


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training import train_digits_mlp

    return train_digits_mlp(tmp_path_factory.mktemp("runs"), "model.kwargs.hidden=[8]")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine torch.save archive whose members are deflated: 80 KB that unpacks to 80 MB."""
    buf = __import__("io").BytesIO()
    torch.save({"w": torch.zeros(BOMB_ELEMENTS)}, buf)
    src = zipfile.ZipFile(buf)
    path = tmp_path_factory.mktemp("bomb") / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return path


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / trained.name
    shutil.copytree(trained, dst)
    return dst


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from kiln.cli.main import app

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        app(list(args), standalone_mode=False)
    return int(info.value.code or 0), capsys.readouterr().err


def _assert_one_line(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# --------------------------------------------------------------------------- file damage


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _rewrite(path: Path, edit: Callable[[dict], None]) -> None:
    header, body = _header(path)
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _first_f32(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")


def _bad_json(p: Path) -> None:
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    p.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n :])


def _huge_shape(h: dict) -> None:
    _first_f32(h)["shape"] = [2**40, 2**40]


def _offsets_out(h: dict) -> None:
    _first_f32(h)["data_offsets"][1] += 10**9


def _unknown_dtype(h: dict) -> None:
    _first_f32(h)["dtype"] = "Q32"


def _dtype_changed(h: dict) -> None:
    for k, v in h.items():
        if k != "__metadata__" and v["dtype"] == "F32":
            v["dtype"] = "I32"  # same size: only a check against the model can see it


SAFETENSORS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "too short"),
    "header length": (
        lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
        "header length",
    ),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt"),
    "bad JSON": (_bad_json, "not valid JSON"),
    "unknown dtype": (lambda p: _rewrite(p, _unknown_dtype), "unknown dtype"),
    "huge shape": (lambda p: _rewrite(p, _huge_shape), "needs"),
    "offsets out of range": (lambda p: _rewrite(p, _offsets_out), "outside"),
    "dtype changed F32->I32": (lambda p: _rewrite(p, _dtype_changed), "I32 in the file"),
}


def _write_ckpt_without_weights(run: Path) -> None:
    path = _ckpt(run)
    saved = torch.load(path, weights_only=True)
    del saved["model"], saved["optimizer"]
    torch.save(saved, path)


def _point_outside(run: Path) -> None:
    # A genuine checkpoint outside the run's checkpoints folder: only containment refuses it.
    outside = run.parent.parent / "outside.ckpt"
    shutil.copy(_ckpt(run), outside)
    (run / "checkpoints" / "last").write_text("../../../outside.ckpt")


CHECKPOINTS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "random bytes": (
        lambda r, b: _ckpt(r).write_bytes(random.Random(0).randbytes(4000)),
        "corrupt",
    ),
    "empty pickle (pop from empty list)": (
        lambda r, b: _ckpt(r).write_bytes(b"\x80\x05."),
        "corrupt",
    ),
    "truncated": (
        lambda r, b: _ckpt(r).write_bytes(_ckpt(r).read_bytes()[:3000]),
        "corrupt or truncated",
    ),
    "missing keys": (lambda r, b: _write_ckpt_without_weights(r), "lacks 'model'"),
    "last points outside": (lambda r, b: _point_outside(r), "refused to follow"),
    "empty pointer": (
        lambda r, b: (r / "checkpoints" / "last").write_bytes(b""),
        "last is corrupt",
    ),
    "decompression bomb": (lambda r, b: shutil.copy(b, _ckpt(r)), "decompression bomb"),
}


def _verbs(run: Path) -> dict[str, list[str]]:
    return {
        "resume": ["train", str(run / "config.yaml"), f"resume={run}"],
        "eval --checkpoint": ["eval", str(run), "--checkpoint", "last"],
        "consolidate": ["consolidate", str(run)],
    }


# --------------------------------------------------------------------------- the tables


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_malformed_safetensors_through_eval_and_load_model(
    case: str, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import kiln

    damage, words = SAFETENSORS[case]
    weights = run / "model.safetensors"
    damage(weights)
    before = _hashes(run.parent)
    start = time.monotonic()
    code, err = _cli(capsys, "eval", str(run))
    _assert_one_line(code, err, "model.safetensors", words)
    with pytest.raises(KilnError, match=words.replace("(", r"\(")):
        kiln.load_model(run)
    assert time.monotonic() - start < SECONDS
    assert _hashes(run.parent) == before


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_malformed_safetensors_as_pretrained(
    case: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, words = SAFETENSORS[case]
    weights = run / "model.safetensors"
    damage(weights)
    before = _hashes(run.parent)
    out = tmp_path / "fresh"
    start = time.monotonic()
    cfg = str(run / "config.yaml")
    code, err = _cli(capsys, "train", cfg, f"model.pretrained={weights}", f"out_dir={out}")
    # the pretrained load casts within a dtype kind, so F32 -> I32 is caught as a kind change
    _assert_one_line(code, err, "model.safetensors", "int32" if "dtype changed" in case else words)
    assert time.monotonic() - start < SECONDS
    assert _hashes(run.parent) == before
    assert not out.exists() or not any(out.rglob("*.ckpt"))


@pytest.mark.parametrize("verb", ["resume", "eval --checkpoint", "consolidate"])
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_malformed_checkpoints(
    case: str, verb: str, run: Path, bomb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, words = CHECKPOINTS[case]
    damage(run, bomb)
    if case == "missing keys" and verb == "resume":
        words = "lacks 'model', 'optimizer'"
    before = _hashes(run.parent)
    start = time.monotonic()
    code, err = _cli(capsys, *_verbs(run)[verb])
    _assert_one_line(code, err, words)
    assert time.monotonic() - start < SECONDS
    assert _hashes(run.parent) == before


def test_pretrained_pt_bomb_is_refused_before_loading(
    bomb: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.errors import UnsafeFileError
    from kiln.models.pretrained import read_state_dict

    with pytest.raises(UnsafeFileError, match="decompression bomb"):
        read_state_dict(bomb)
    out = tmp_path / "fresh"
    code, err = _cli(
        capsys, "train", str(run / "config.yaml"), f"model.pretrained={bomb}", f"out_dir={out}"
    )
    _assert_one_line(code, err, "decompression bomb", "KILN_MAX_UNPACKED_BYTES")


def test_pretrained_pt_with_integer_weights_is_refused(run: Path, tmp_path: Path) -> None:
    from kiln.errors import ModelError
    from kiln.models.pretrained import load_pretrained

    model = __import__("kiln").load_model(run)
    fake = {
        k: v.to(torch.int32) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    torch.save(fake, tmp_path / "ints.pt")
    with pytest.raises(ModelError, match="wrong kind of dtype"):
        load_pretrained(model, tmp_path / "ints.pt")


def test_hf_index_shard_outside_the_folder_is_refused(run: Path, tmp_path: Path) -> None:
    from kiln.errors import UnsafeFileError
    from kiln.models.pretrained import read_state_dict

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": f"../{run.name}/model.safetensors"}})
    )
    shutil.copytree(run, tmp_path / run.name)
    with pytest.raises(UnsafeFileError, match="not a file beside it"):
        read_state_dict(hf)


# --------------------------------------------------------------------------- DCP metadata


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a forged .metadata would run on pickle.load
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _forge_sharded(run: Path, marker: Path, folder: str = "step-forged.dcp") -> None:
    path = _ckpt(run)
    saved = torch.load(path, weights_only=True)
    del saved["model"], saved["optimizer"]
    saved["sharded"] = folder
    torch.save(saved, path)
    shards = run / "checkpoints" / folder
    shards.mkdir(exist_ok=True)
    (shards / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))


def _kiln(*args: str) -> subprocess.CompletedProcess[str]:
    return run_kiln(*args, timeout=120)


@pytest.mark.parametrize("verb", ["resume", "eval --checkpoint", "consolidate"])
def test_forged_dcp_metadata_never_runs(
    verb: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    _forge_sharded(run, marker)
    before = _hashes(run.parent)
    code, err = _cli(capsys, *_verbs(run)[verb])
    assert not marker.exists()
    _assert_one_line(code, err, "refused", "posix.system")
    assert _hashes(run.parent) == before


def test_forged_dcp_metadata_through_the_real_cli(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _forge_sharded(run, marker)
    before = _hashes(run.parent)
    for verb, args in _verbs(run).items():
        proc = _kiln(*args)
        _assert_one_line(proc.returncode, proc.stderr, "refused")
        assert not marker.exists(), verb
    assert _hashes(run.parent) == before


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_reader_refuses_the_payload_itself(tmp_path: Path) -> None:
    """Even past the checkpoint check, DCP's load goes through the restricted reader."""
    import torch.distributed.checkpoint as dcp

    from kiln.errors import UnsafeFileError
    from kiln.safeio.dcp import read_metadata, safe_reader

    net = torch.nn.Linear(3, 2)
    folder = tmp_path / "s.dcp"
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(folder))
    assert type(read_metadata(folder)).__name__ == "Metadata"
    again = torch.nn.Linear(3, 2)
    state = {"model": again.state_dict()}
    dcp.load(state, storage_reader=safe_reader(folder))
    torch.testing.assert_close(state["model"]["weight"], net.weight.detach())
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeFileError, match=r"posix\.system"):
        read_metadata(folder)
    with pytest.raises(BaseException, match="refused"):
        dcp.load(state, storage_reader=safe_reader(folder))
    assert not marker.exists()


def test_sharded_folder_outside_the_checkpoints_is_refused(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _forge_sharded(run, tmp_path / "pwned", folder="step-1.dcp")
    path = _ckpt(run)
    saved = torch.load(path, weights_only=True)
    saved["sharded"] = "../../x.dcp"
    torch.save(saved, path)
    code, err = _cli(capsys, "consolidate", str(run))
    _assert_one_line(code, err, "not a folder beside the checkpoint")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_load_sharded_never_hands_dcp_unchecked_metadata(tmp_path: Path) -> None:
    """The trainer's own DCP load (past any checkpoint-file check) reads metadata safely too."""
    import torch.distributed.checkpoint as dcp

    from kiln.train.checkpoint import state

    net = torch.nn.Linear(3, 2)
    folder = tmp_path / "step-1.dcp"
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(folder))
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(BaseException, match="refused"):
        state.load_sharded(torch.nn.Linear(3, 2), None, folder)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["load_quantized", "load_pruned", "quantize CLI"])
def test_compressed_model_loaders_check_the_header(
    loader: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.compress.prune.io import load_pruned
    from kiln.compress.quantize.core import load_quantized
    from kiln.errors import CorruptFileError

    _rewrite(run / "model.safetensors", _offsets_out)
    if loader == "quantize CLI":
        code, err = _cli(capsys, "quantize", str(run), "--method", "dynamic")
        _assert_one_line(code, err, "model.safetensors is corrupt")
        return
    load = {"load_quantized": load_quantized, "load_pruned": load_pruned}[loader]
    with pytest.raises(CorruptFileError, match="outside"):
        load(run)

"""Bad data files through ``kiln train``: one ``error:`` line naming the file, exit 2, no traceback.

Each case writes a damaged file (a corrupt or truncated image, a CSV or text file that is not
UTF-8, a ragged or empty CSV, a missing label column...) into ``tmp_path``, points a small config
at it and runs the ``train`` verb. Most cases run in-process through the same error mapping the
CLI uses (:func:`kiln.cli.errors.run_cli`); a few start the real ``kiln`` process, which costs
about two seconds each. A good file of the same kind must train (exit 0), so the harness itself
can tell success from failure.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image
from runners import run_kiln

from kiln.cli.errors import run_cli
from kiln.cli.train import run_train

#: Seconds a bad file may take to be refused (in-process); a hang or a full epoch would exceed it.
LIMIT_S = 20.0

QUIET = {"log": {"tensorboard": False, "progress": False}}


# --------------------------------------------------------------------------- files


def _png(size: tuple[int, int] = (9, 7), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image_folder(root: Path, per_class: int = 6) -> Path:
    """Two classes of small PNGs in different sizes (resized by the loader, so allowed)."""
    for cls, size, color in (("cat", (12, 10), (200, 40, 40)), ("dog", (9, 7), (30, 60, 220))):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(min(255, c + 6 * i) for c in color)
            (root / cls / f"{i}.png").write_bytes(_png(size, shade))  # type: ignore[arg-type]
    return root


GOOD_CSV = "a,b,label\n" + "".join(f"{i % 7},{(3 * i) % 5},{'xy'[i % 2]}\n" for i in range(40))


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# Each maker builds the bad input under tmp and returns (config data section, the named file).
Maker = Callable[[Path], tuple[dict[str, object], Path]]


def _images(tmp: Path, name: str, data: bytes, **extra: object) -> tuple[dict[str, object], Path]:
    root = _image_folder(tmp / "pets")
    bad = _write(root / "dog" / name, data)
    return {"name": "images", "path": str(root), "image_size": 8, **extra}, bad


def _folder_of(root: Path, named: Path | None = None) -> tuple[dict[str, object], Path]:
    """An image-folder config for ``root``; the message must name ``named`` (default root)."""
    return {"name": "images", "path": str(root), "image_size": 8}, named or root


def _csv(tmp: Path, data: bytes | str, target: str = "label") -> tuple[dict[str, object], Path]:
    path = _write(tmp / "table.csv", data)
    return {"name": "csv", "path": str(path), "target": target}, path


def _text(tmp: Path, data: bytes) -> tuple[dict[str, object], Path]:
    path = _write(tmp / "corpus.txt", data)
    return {"name": "text", "path": str(path), "text": {"block_size": 8}}, path


CASES: dict[str, tuple[Maker, str]] = {
    # images -------------------------------------------------------------------------------
    "image-garbage": (
        lambda t: _images(t, "9.png", b"this is not a png at all\n" * 4),
        r"image .*9\.png cannot be read \(not an image format.*remove or replace that file",
    ),
    "image-empty-file": (
        lambda t: _images(t, "9.jpg", b""),
        r"9\.jpg cannot be read .*remove or replace",
    ),
    "image-truncated-png": (
        # Without standardisation nothing but the up-front check decodes the file before
        # training: it must still be refused before a run directory exists.
        lambda t: _images(t, "9.png", _png((64, 64))[:-40], standardize=False),
        r"9\.png cannot be read \(.*\); remove or replace",
    ),
    "image-truncated-jpeg": (
        lambda t: _images(t, "9.jpg", _jpeg((64, 64))[:300]),
        r"(?i)9\.jpg cannot be read \(.*truncated.*\); remove or replace",
    ),
    "image-bad-png-checksum": (
        lambda t: _images(t, "9.png", _png()[:-20] + b"\x00" * 4 + _png()[-16:]),
        r"9\.png cannot be read",
    ),
    "image-no-class-folders": (
        lambda t: _folder_of(_write(t / "flat" / "a.png", _png()).parent),
        r"flat has no class subfolders; arrange images as",
    ),
    "image-class-without-images": (
        lambda t: _folder_of(
            _image_folder(t / "pets"), named=_write(t / "pets" / "fish" / "notes.txt", "-").parent
        ),
        r"class folder .*fish has no images",
    ),
    "image-one-class": (
        lambda t: _folder_of(_write(t / "one" / "cat" / "a.png", _png()).parents[1]),
        r"one has one class folder \('cat'\); classification needs at least two",
    ),
    # CSV ----------------------------------------------------------------------------------
    "csv-latin1": (
        lambda t: _csv(t, "a,b,label\n1,2,caf\xe9\n".encode("latin-1") + GOOD_CSV[10:].encode()),
        r"table\.csv is not UTF-8 text: byte 17 \(line 2\) is 0xe9 .* re-save it as UTF-8",
    ),
    "csv-utf16": (
        lambda t: _csv(t, GOOD_CSV.encode("utf-16")),
        r"table\.csv is UTF-16 text .* re-save it as UTF-8",
    ),
    "csv-utf16-without-bom": (
        lambda t: _csv(t, GOOD_CSV.encode("utf-16-le")),
        r"table\.csv is not UTF-8 text: byte 1 \(line 1\) is a NUL byte, so it is binary or UTF-16",
    ),
    "csv-ragged-row": (
        lambda t: _csv(t, GOOD_CSV + "1,2\n"),
        r"row 41 \(line 42 of .*table\.csv\) has 2 cells but the header has 3 columns",
    ),
    "csv-empty": (
        lambda t: _csv(t, ""),
        r"CSV file .*table\.csv is empty; a CSV needs a header row",
    ),
    "csv-blank-lines-only": (
        lambda t: _csv(t, "\n\n\r\n"),
        r"table\.csv is empty",
    ),
    "csv-header-only": (
        lambda t: _csv(t, "a,b,label\n"),
        r"table\.csv has a header but no data rows",
    ),
    "csv-label-column-missing": (
        lambda t: _csv(t, GOOD_CSV, target="species"),
        r"target column 'species' is not in \S*table\.csv; columns: a, b, label",
    ),
    "csv-huge-unquoted-cell": (
        lambda t: _csv(t, 'a,b,label\n1,2,"' + "x" * 200_000 + "\n"),
        r"line 2 of .*table\.csv cannot be read as CSV \(field larger than field limit",
    ),
    "csv-one-class": (
        lambda t: _csv(t, "a,b,label\n" + "1,2,x\n3,4,x\n" * 10),
        r"target column 'label' of .*table\.csv holds one class \('x'\)",
    ),
    "csv-non-numeric-feature": (
        lambda t: _csv(t, GOOD_CSV.replace("\n3,", "\nthree,", 1)),
        r"column 'a' has the non-numeric value 'three'.* table\.csv|table\.csv\), column 'a'",
    ),
    "csv-is-a-device": (
        lambda t: ({"name": "csv", "path": "/dev/zero", "target": "label"}, Path("/dev/zero")),
        r"CSV file is not a regular file \(a device, pipe or socket\): /dev/zero",
    ),
    # text ---------------------------------------------------------------------------------
    "text-invalid-utf8": (
        lambda t: _text(t, b"hello world, " * 20 + b"\xff\xfe tail"),
        r"corpus\.txt is not UTF-8 text: byte 260 \(line 1\) is 0xff",
    ),
    "tsv-latin1": (
        lambda t: (
            {
                "name": "topics",
                "path": str(_write(t / "topics.tsv", "sports\tun caf\xe9".encode("latin-1"))),
            },
            t / "topics.tsv",
        ),
        r"TSV file .*topics\.tsv is not UTF-8 text: byte 13 \(line 1\) is 0xe9",
    ),
    "text-folder": (
        lambda t: ({"name": "text", "path": str(t)}, t),
        r"text file is a folder, not a file",
    ),
}


def _train(tmp: Path, data: dict[str, object], capsys: pytest.CaptureFixture[str]) -> tuple:
    """Run ``kiln train`` in-process; (exit code, stderr, seconds)."""
    out = tmp / "runs"
    cfg = {
        "name": "bad",
        "out_dir": str(out),
        "data": {"batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2, **data},
        "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "train": {"epochs": 1},
        **QUIET,
    }
    if data.get("name") in ("images",):
        cfg["model"] = {"name": "resnet", "kwargs": {"depths": [1], "width": 4}}
    if data.get("name") == "topics":
        cfg["model"] = {"name": "bow"}
    if data.get("name") == "text":
        cfg["model"] = {"name": "gpt", "kwargs": {"n_layer": 1, "n_head": 1, "n_embd": 8}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    code = 0
    try:
        run_cli(lambda: run_train([str(path), "train.epochs=1"]), debug=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err, time.perf_counter() - start


def _assert_one_line(err: str, named: Path, pattern: str) -> None:
    import re

    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len([line for line in lines if line.startswith("error:")]) == 1, err
    assert len(lines) == 1, err
    assert str(named) in lines[0], f"the message does not name {named}: {err}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {err!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_file_is_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, pattern = CASES[case]
    data, named = make(tmp_path)
    code, err, seconds = _train(tmp_path, data, capsys)
    assert code == 2, err
    _assert_one_line(err, named, pattern)
    assert seconds < LIMIT_S
    assert not (tmp_path / "runs").exists(), "refused before any run directory is made"


@pytest.mark.parametrize(
    "source",
    ["images", "csv", "text"],
)
def test_good_files_of_each_kind_train(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control: the same harness with an intact file exits 0 and writes a run."""
    if source == "images":
        data: dict[str, object] = {
            "name": "images",
            "path": str(_image_folder(tmp_path / "pets")),
            "image_size": 8,
        }
    elif source == "csv":
        data = _csv(tmp_path, GOOD_CSV)[0]
    else:
        data = _text(tmp_path, b"hello world, " * 20)[0]
    code, err, _ = _train(tmp_path, data, capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "bad" / "model.safetensors").is_file()


CLI_CASES = ["image-truncated-png", "csv-latin1", "csv-ragged-row"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_data_file_through_the_kiln_process(case: str, tmp_path: Path) -> None:
    make, pattern = CASES[case]
    data, named = make(tmp_path)
    args = [f"data.{k}={v}" for k, v in data.items()]
    model = (
        ["model.name=resnet", "model.kwargs.depths=[1]", "model.kwargs.width=4"]
        if data["name"] == "images"
        else ["model.name=mlp", "model.kwargs.hidden=[8]"]
    )
    start = time.perf_counter()
    proc = run_kiln(
        "train",
        *args,
        *model,
        f"out_dir={tmp_path / 'runs'}",
        "train.epochs=1",
        "log.tensorboard=false",
        "log.progress=false",
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    _assert_one_line(proc.stderr, named, pattern)
    assert seconds < 60

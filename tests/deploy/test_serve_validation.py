"""One validation for both servers: the bad-input table through ``kiln serve``'s parser and the
generated TorchServe handler's ``handle()`` (no Java, no server: the handler's code, called)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from bad_inputs import BAD_INPUT_PARAMS, INPUT_SHAPE

from kiln.deploy.serve.inputs import RequestError, parse_inputs
from kiln.deploy.serve.validate import InputError, decode_json
from kiln.deploy.torchserve.archive import handler_source, validation_source


def _strict_json(text: str) -> Any:
    """Parse an answer as a client would; NaN or Infinity in it is invalid JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in an answer: not valid JSON")

    return json.loads(text, parse_constant=refuse)


def _write_handler(folder: Path) -> None:
    """What the archive holds of the handler: ``handler.py`` and its ``serve_validate.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handler.py").write_text(
        handler_source(
            model_file="model.pt2", input_shape=INPUT_SHAPE, task="classification", class_names=None
        )
    )
    (folder / "serve_validate.py").write_text(validation_source())


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated handler, imported from its folder, with a small model in place of the .pt2."""
    folder = tmp_path_factory.mktemp("handler")
    _write_handler(folder)
    sys.path.insert(0, str(folder))  # as TorchServe does with the model folder
    try:
        path = folder / "handler.py"
        spec = importlib.util.spec_from_file_location("kiln_generated_handler", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("serve_validate", None)


class _Context:
    """What TorchServe hands ``handle()``: per-request status and content type."""

    def __init__(self) -> None:
        self.status: dict[int, int] = {}

    def set_response_content_type(self, i: int, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, i: int) -> None:
        self.status[i] = code


def _kiln_status(body: bytes) -> int:
    """The status ``kiln serve`` gives ``body`` (what its ``/predict`` does before the batcher)."""
    try:
        parse_inputs(decode_json(body), INPUT_SHAPE, fast=b"true" not in body)
    except InputError as exc:
        return exc.status
    except RequestError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize(("body", "status"), BAD_INPUT_PARAMS)
def test_kiln_serve_parser_refuses(body: bytes, status: int) -> None:
    assert _kiln_status(body) == status


@pytest.mark.parametrize(("body", "status"), BAD_INPUT_PARAMS)
def test_handler_refuses_alike_without_failing_the_batch(
    handler: ModuleType, body: bytes, status: int
) -> None:
    """The bad request gets kiln serve's status; the good one beside it in the batch, 200."""
    h = handler.KilnHandler()
    h.model = torch.nn.Linear(64, 10).eval()
    good = json.dumps({"inputs": [0.25] * 64}).encode()
    ctx = _Context()
    answers = h.handle([{"body": good}, {"body": body}, {"data": good}], ctx)
    assert len(answers) == 3
    assert ctx.status == {1: status}
    parsed = [_strict_json(a) for a in answers]
    assert "error" in parsed[1] and "outputs" not in parsed[1]
    for ok in (parsed[0], parsed[2]):
        probs = ok["outputs"][0]["probabilities"]
        assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-5


def test_handler_packs_the_shared_rules_and_imports_only_torch(tmp_path: Path) -> None:
    """The packed copy is the module's source; the handler module defines one class (TorchServe
    refuses more) and imports no kiln (checked in an isolated interpreter)."""
    import kiln.deploy.serve.validate as shared

    assert validation_source() == Path(shared.__file__).read_text()
    _write_handler(tmp_path)
    code = (
        "import inspect, sys\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import handler\n"
        "own = [n for n, c in inspect.getmembers(handler, inspect.isclass)\n"
        "       if c.__module__ == handler.__name__]\n"
        "print(own, sorted(m for m in sys.modules if m.split('.')[0] == 'kiln'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['KilnHandler'] []"

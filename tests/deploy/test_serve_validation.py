"""One validation for both servers: the bad-input table through ``kiln serve``'s parser and the
generated TorchServe handler's ``handle()`` (no Java, no server: the handler's code, called)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from bad_inputs import BAD_INPUT_PARAMS, INPUT_SHAPE

from kiln.deploy.serve_inputs import RequestError, parse_inputs
from kiln.deploy.serve_validate import InputError, decode_json
from kiln.deploy.torchserve import handler_source


def _strict_json(text: str) -> Any:
    """Parse an answer as a client would; NaN or Infinity in it is invalid JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in an answer: not valid JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The generated handler, imported from its file, with a small model in place of the .pt2."""
    folder = tmp_path_factory.mktemp("handler")
    path = folder / "handler.py"
    path.write_text(
        handler_source(
            model_file="model.pt2", input_shape=INPUT_SHAPE, task="classification", class_names=None
        )
    )
    spec = importlib.util.spec_from_file_location("kiln_generated_handler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_handler_embeds_the_shared_rules_and_imports_only_torch(tmp_path: Path) -> None:
    """The embedded copy is the module's source; the handler imports no kiln (isolated run)."""
    src = handler_source(
        model_file="model.pt2", input_shape=INPUT_SHAPE, task="classification", class_names=None
    )
    import kiln.deploy.serve_validate as shared

    assert Path(shared.__file__).read_text().strip() in src
    (tmp_path / "handler.py").write_text(src)
    code = (
        "import sys\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import handler\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kiln'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"

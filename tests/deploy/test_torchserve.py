"""``kiln export --format torchserve``: the archive, its torch-only handler, a real TorchServe."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from runners import run_kiln
from training import train_digits_mlp

from kiln.deploy.serve.inputs import format_outputs
from kiln.deploy.torchserve.archive import (
    TorchServeResult,
    export_torchserve,
    model_name_for,
)
from kiln.deploy.torchserve.process import config_properties, free_ports, launch_torchserve
from kiln.run import read_data_info
from kiln.train.checkpoint.weights import load_model

TOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny digits MLP, one epoch."""
    out = tmp_path_factory.mktemp("ts-run")
    return train_digits_mlp(out, "name=tiny", "model.kwargs.hidden=[32]")


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> TorchServeResult:
    return export_torchserve([run_dir])


def _expected(run_dir: Path, x: torch.Tensor) -> list[dict[str, Any]]:
    """What ``kiln serve`` answers for ``x``: the eager model, formatted."""
    with torch.inference_mode():
        out = load_model(run_dir).eval()(x)
    return format_outputs(out, read_data_info(run_dir))


def _assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"] and g["class_index"] == w["class_index"]
        torch.testing.assert_close(
            torch.tensor(g["probabilities"]), torch.tensor(w["probabilities"]), atol=TOL, rtol=0
        )


def test_archive_holds_model_handler_and_manifest(
    exported: TorchServeResult, run_dir: Path
) -> None:
    assert exported.archive == run_dir / "export/torchserve/model-store/tiny.mar"
    assert exported.model_name == "tiny" and exported.model_store == exported.archive.parent
    names = set(zipfile.ZipFile(exported.archive).namelist())
    assert {"model.pt2", "handler.py", "model-config.yaml", "manifest.json"} <= names
    assert "serve_validate.py" in names  # the shared validation rules the handler imports
    assert "MAR-INF/MANIFEST.json" in names
    manifest = json.loads((exported.handler.parent / "manifest.json").read_text())
    assert manifest["format"] == "exported" and manifest["parity_ok"] is True
    assert all(p["max_abs"] < 1e-4 for p in manifest["parity"])
    assert manifest["torchserve"]["model_name"] == "tiny"
    assert model_name_for("runs/my run.v2") == "my_run_v2"


def test_handler_needs_only_torch(
    exported: TorchServeResult, run_dir: Path, tmp_path: Path
) -> None:
    """The generated handler, loaded in an isolated interpreter, answers like ``kiln serve``."""
    x = torch.randn(5, 64)
    code = (
        "import json, sys\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]\n"
        "folder = sys.argv[1]\n"
        "sys.path.insert(0, folder)\n"
        "import handler\n"
        "class Context:\n"
        "    system_properties = {'model_dir': folder}\n"
        "    status = {}\n"
        "    def set_response_content_type(self, i, v): pass\n"
        "    def set_response_status(self, code, phrase, i): self.status[i] = code\n"
        "ctx = Context()\n"
        "h = handler.KilnHandler()\n"
        "h.initialize(ctx)\n"
        "x = json.loads(sys.argv[2])\n"
        "data = [{'body': {'inputs': x[0]}}, {'body': json.dumps({'inputs': x[1:4]}).encode()},\n"
        "        {'body': b'{\"inputs\": [1, 2]}'}, {'data': {'inputs': x[4]}}]\n"
        "out = [json.loads(a) for a in h.handle(data, ctx)]\n"
        "print(json.dumps({'out': out, 'status': ctx.status, 'kiln': 'kiln' in sys.modules}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(exported.handler.parent), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["kiln"] is False
    out = result["out"]
    want = _expected(run_dir, x)
    _assert_same(out[0]["outputs"], want[:1])
    _assert_same(out[1]["outputs"], want[1:4])
    _assert_same(out[3]["outputs"], want[4:])
    assert "expected [64]" in out[2]["error"] and result["status"] == {"2": 422}


def test_missing_run_says_what_to_pass(tmp_path: Path) -> None:
    proc = run_kiln("export", str(tmp_path / "nope"), "--format", "torchserve", timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "kiln train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_archiver_says_how_to_install(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "model_archiver", None)  # find_spec -> None: not installed
    with pytest.raises(ImportError, match="pip install torch-model-archiver torchserve"):
        export_torchserve([run_dir], out=tmp_path)


def test_config_properties_moves_grpc_off_the_defaults() -> None:
    """gRPC gets free ports too: two TorchServes (or anything on 7070/7071) can run side by side."""
    ports = free_ports("127.0.0.1", 5)
    assert len(set(ports)) == 5
    urls, text = config_properties("127.0.0.1", ports)
    assert urls == [f"http://127.0.0.1:{p}" for p in ports[:3]]
    assert f"grpc_inference_port={ports[3]}\n" in text
    assert f"grpc_management_port={ports[4]}\n" in text
    with pytest.raises(ValueError, match="5 distinct ports"):
        config_properties("127.0.0.1", [1, 1, 2, 3, 4])


def _post(port: int, path: str, body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_real_torchserve_answers_like_the_eager_model(
    exported: TorchServeResult, run_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("TorchServe needs Java 17 (no java on PATH, no JAVA_HOME)")
    if (
        shutil.which("torchserve") is None
        and not (Path(sys.executable).parent / "torchserve").is_file()
    ):
        pytest.skip("torchserve is not installed (pip install torchserve torch-model-archiver)")
    x = torch.randn(24, 64)
    want = _expected(run_dir, x)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Hold TorchServe's default gRPC ports: the launch must not need them (free ports instead).
    held = []
    for default in (7070, 7071):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", default))
            s.listen(1)
            held.append(s)
        except OSError:
            s.close()  # already taken by something else: the same test
    try:
        ts = launch_torchserve(exported.archive, tmp_path / "ts", env=env)
    finally:
        for s in held:
            s.close()
    config = (tmp_path / "ts" / "config.properties").read_text()
    assert "grpc_inference_port=" in config and "grpc_management_port=" in config
    try:
        port = int(ts.url.rsplit(":", 1)[1])
        path = f"/predictions/{exported.model_name}"
        # 16 one-example requests at once: TorchServe batches them into shared forward passes.
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda row: _post(port, path, {"inputs": row}), x[:16].tolist())
            )
        for i, (status, body) in enumerate(answers):
            assert status == 200, body
            _assert_same(body["outputs"], want[i : i + 1])
        status, body = _post(port, path, {"inputs": x[16:].tolist()})
        assert status == 200, body
        _assert_same(body["outputs"], want[16:])
        status, body = _post(port, path, {"inputs": [1.0, 2.0]})
        assert status == 422 and "expected [64]" in body["error"]
        for bad in (b'{"inputs": [1e39' + b", 0" * 63 + b"]}", b'{"inputs": [1' + b"0" * 400):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request("POST", path, body=bad + (b"" if bad.endswith(b"}") else b"]}"))
                resp = conn.getresponse()
                status, answer = resp.status, resp.read()
            finally:
                conn.close()
            assert status == 422, answer
    finally:
        ts.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(ts.proc.pid, 0)  # the launcher, the JVM and its workers are all gone

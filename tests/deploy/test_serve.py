"""``kiln serve``: predictions, batching, malformed input and graceful shutdown, end to end."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import BAD_INPUT_PARAMS
from training import train_digits_mlp

from helpers.serving import Server
from kiln.deploy.serve.server import RequestError, load_backend, parse_inputs
from kiln.train.checkpoint.weights import load_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    return train_digits_mlp(tmp)


@pytest.fixture(scope="module", params=["loop", "thread"])
def server(run_dir: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The server with each batcher: on the event loop (default) and on a worker thread."""
    log = run_dir / f"serve-{request.param}.log"
    s = Server(run_dir, log, "--max-batch", "32", "--batcher", request.param)
    try:
        yield s
    finally:
        assert s.close() == 0


@pytest.mark.parametrize("fast", [False, True])
def test_parse_inputs_shapes(fast: bool) -> None:
    x, single = parse_inputs({"inputs": [0.0] * 4}, (4,), fast=fast)
    assert single and x.shape == (1, 4) and x.dtype == torch.float32
    x, single = parse_inputs({"inputs": [[1] * 4, [2] * 4]}, (4,), fast=fast)
    assert not single and x.shape == (2, 4) and x.dtype == torch.float32
    assert x.tolist() == [[1.0] * 4, [2.0] * 4]
    cases: list[Any] = [
        {"inputs": [0.0] * 3},
        {"inputs": ["a"] * 4},
        {"inputs": ["1.5"] * 4},  # numeric strings are not numbers
        {"inputs": [None] * 4},
        {"inputs": [[1, 2], [3]]},
        {"inputs": [float("nan")] * 4},
        {"inputs": [1e39] * 4},  # beyond float32
        {"inputs": [10**400] * 4},  # a huge JSON integer must not escape as OverflowError
        {"x": 1},
        [1],
        {"inputs": []},
    ]
    for bad in cases:
        with pytest.raises(RequestError) as err:
            parse_inputs(bad, (4,), fast=fast)
        assert err.value.status == 422


def test_unsupported_target(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot serve"):
        load_backend(f)
    with pytest.raises(FileNotFoundError):
        load_backend(tmp_path / "missing")


@pytest.mark.slow
def test_predictions_match_eager(server: Server, run_dir: Path) -> None:
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = torch.softmax(load_model(run_dir)(x), dim=-1)
    status, body = server.predict(x.tolist())
    assert status == 200
    got = torch.tensor([o["probabilities"] for o in body["outputs"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [o["class_index"] for o in body["outputs"]] == want.argmax(-1).tolist()
    status, one = server.predict(x[0].tolist())
    assert status == 200 and len(one["outputs"]) == 1
    for path in ("/health", "/ready", "/openapi.json"):
        assert server.request("GET", path)[0] == 200
    assert "/predict" in json.loads(server.request("GET", "/openapi.json")[1])["paths"]


def _batches(server: Server) -> tuple[int, int]:
    """Forward passes of at most 2 rows, and all forward passes, so far."""
    text = server.request("GET", "/metrics")[1].decode()
    small = re.search(r'kiln_serve_batch_size_bucket\{le="2"\} (\d+)', text)
    total = re.search(r"kiln_serve_batch_size_count (\d+)", text)
    assert small and total, text
    return int(small.group(1)), int(total.group(1))


@pytest.mark.slow
def test_concurrent_requests_are_batched(server: Server) -> None:
    xs = [torch.randn(64).tolist() for _ in range(32)]
    before = _batches(server)
    barrier = threading.Barrier(32)

    def call(x: list[float]) -> tuple[int, Any]:
        barrier.wait()
        return server.predict([x] * 2)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, xs))
    single = [server.predict(x)[1]["outputs"][0] for x in xs[:4]]
    for (status, body), one in zip(answers, single + [None] * 28, strict=True):
        assert status == 200 and len(body["outputs"]) == 2
        if one is not None:
            assert body["outputs"][0]["probabilities"] == pytest.approx(
                one["probabilities"], abs=1e-5
            )
    after = _batches(server)
    # every request carries 2 rows: a forward pass over more than 2 rows batched requests
    assert after[1] - before[1] > after[0] - before[0], (before, after)
    metrics = server.request("GET", "/metrics")[1].decode()
    assert (
        "kiln_serve_queue_depth" in metrics and 'kiln_serve_requests_total{code="200"}' in metrics
    )


@pytest.mark.slow
def test_malformed_stream_never_5xx(server: Server) -> None:
    rng = random.Random(0)
    good = json.dumps({"inputs": [0.5] * 64}).encode()
    bad: list[tuple[str, str, bytes]] = [
        ("POST", "/predict", json.dumps({"inputs": [0.5] * 63}).encode()),
        ("POST", "/predict", json.dumps({"inputs": ["a"] * 64}).encode()),
        ("POST", "/predict", b""),
        ("POST", "/predict", b"{" * 10 + b"not json"),
        ("POST", "/predict", b"[" * 100000),
        ("POST", "/predict", b" " * (2 << 20)),
        ("POST", "/predict", json.dumps({"x": 1}).encode()),
        ("POST", "/predict", b'{"inputs": NaN}'),
        ("GET", "/predict", b""),
        ("GET", "/nowhere", b""),
        ("DELETE", "/health", b""),
    ]
    jobs = [
        ("POST", "/predict", good) if rng.random() > 0.2 else rng.choice(bad) for _ in range(500)
    ]

    def call(job: tuple[str, str, bytes]) -> int:
        # A connection reset is a failure: the client sends the whole body (the 2 MiB one too)
        # and must read the server's answer, 413 included.
        method, path, body = job
        return server.request(method, path, body or None)[0]

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, jobs))
    assert len(codes) == 500
    assert all(c < 500 for c in codes), sorted(set(codes))
    assert codes.count(200) >= 0.7 * len(codes)
    assert {400, 413, 422, 404, 405} <= set(codes)
    assert server.request("GET", "/ready")[0] == 200
    status, _, _ = server.request("POST", "/predict", b"x", {"Content-Length": str(5 << 20)})
    assert status == 413


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status"), BAD_INPUT_PARAMS)
def test_bad_input_table_over_http(server: Server, body: bytes, status: int) -> None:
    """The table the TorchServe handler is tested with: the same status from ``kiln serve``."""
    got, answer, _ = server.request("POST", "/predict", body, {"Content-Type": "application/json"})
    assert got == status, answer
    assert "error" in json.loads(answer)


@pytest.mark.slow
def test_oversized_upload_gets_413_not_a_reset(server: Server) -> None:
    """A client that sends its whole 2 MiB body reads the 413 (graceful close), every time."""
    for _ in range(20):
        status, answer, headers = server.request("POST", "/predict", b" " * (2 << 20))
        assert status == 413, answer
        assert headers.get("Connection") == "close"


@pytest.mark.slow
def test_torchscript_served_equals_eager(run_dir: Path, tmp_path: Path) -> None:
    from kiln.deploy.export import export_runs

    exported = export_runs([run_dir], format="torchscript", out=tmp_path / "ts")
    assert exported.path.suffix == ".ts"
    s = Server(exported.path, tmp_path / "serve-ts.log")
    try:
        x = torch.randn(6, 64)
        with torch.inference_mode():
            want = torch.softmax(load_model(run_dir)(x), dim=-1)
        status, body = s.predict(x.tolist())
    finally:
        assert s.close() == 0
    assert status == 200, body
    got = torch.tensor([o["probabilities"] for o in body["outputs"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sigterm_drains_in_flight(run_dir: Path) -> None:
    s = Server(run_dir, run_dir / "serve-drain.log", "--max-delay-ms", "300", "--max-batch", "64")
    try:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(s.predict, [0.1] * 64) for _ in range(12)]
            threading.Event().wait(0.15)
            s.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=30) for f in futures]
    finally:
        code = s.close(signal_it=False)
    assert code == 0
    assert all(status == 200 for status, _ in results)

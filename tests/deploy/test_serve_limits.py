"""``kiln serve`` under hostile clients: connection cap, read/idle timeouts, log volume, options.

Each server here runs on a free port (``--port 0``) with small timeouts given as options, so a
test takes seconds; every wait is bounded and readiness is the server's own "ready" line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from runners import kiln_env
from training import train_digits_mlp

from helpers.serving import Server
from kiln.train.checkpoint.weights import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP on the default job's inputs (1x32x32 images), so bodies have its size."""
    return train_digits_mlp(tmp_path_factory.mktemp("limits"), "data.layout=image")


@pytest.fixture(scope="module")
def quick(run_dir: Path) -> Iterator[Server]:
    """A server whose read and idle timeouts are one second."""
    s = Server(
        run_dir,
        run_dir / "serve-quick.log",
        "--header-timeout-s=1",
        "--body-timeout-s=1",
        "--idle-timeout-s=1",
    )
    try:
        yield s
    finally:
        assert s.close() == 0


def _connect(port: int, timeout: float = 20.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def _count_closed(socks: list[socket.socket], want: int, within_s: float) -> int:
    """How many of ``socks`` the server has closed, polling until ``want`` or ``within_s``."""
    for s in socks:
        s.setblocking(False)
    open_ones, closed = list(socks), 0
    deadline = time.monotonic() + within_s
    while True:
        still = []
        for s in open_ones:
            try:
                if s.recv(1) == b"":
                    closed += 1
                else:
                    still.append(s)
            except BlockingIOError:
                still.append(s)
            except ConnectionError:
                closed += 1
        open_ones = still
        if closed >= want or time.monotonic() > deadline:
            return closed
        time.sleep(0.1)


def _raise_fd_limit(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the open-file limit ({hard}) is below the {need} sockets this test opens")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_idle_flood_is_capped_and_health_answers(run_dir: Path) -> None:
    """2,000 idle sockets against --max-connections 256: the oldest idle ones are closed."""
    n, cap = 2000, 256
    _raise_fd_limit(n + 256)
    server = Server(run_dir, run_dir / "serve-flood.log", f"--max-connections={cap}")
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(_connect(server.port))
        start = time.monotonic()
        assert _health(server.port) == 200
        assert time.monotonic() - start < 10.0
        # The server closed all but about `cap` of them (the newest): they read end-of-file.
        assert _count_closed(socks, want=n - cap - 1, within_s=20.0) >= n - cap - 1
        status, answer = server.predict([[[0.5] * 32] * 32])
        assert status == 200, answer
    finally:
        for s in socks:
            s.close()
        assert server.close() == 0


def test_idle_keep_alive_connection_is_closed(quick: Server) -> None:
    """After an answer, a keep-alive connection that sends nothing is closed, without a 408."""
    s = _connect(quick.port)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        data = _read_until_closed(s)
        took = time.monotonic() - start
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200") and b"408" not in data
    assert 0.5 < took < 10.0, took
    # a connection that never sends a byte goes the same way
    s = _connect(quick.port)
    try:
        assert _read_until_closed(s) == b""
    finally:
        s.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"[" * 500,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le",
    ],
    ids=["half-body", "half-headers"],
)
def test_partial_request_answered_408_and_closed(quick: Server, sent: bytes) -> None:
    """A request that stops halfway gets 408 and the connection closes within the timeout."""
    s = _connect(quick.port)
    try:
        s.sendall(sent)
        start = time.monotonic()
        data = _read_until_closed(s)
        took = time.monotonic() - start
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"Connection: close" in data
    assert took < 10.0, took
    assert _health(quick.port) == 200


def test_log_volume_bounded_under_a_flood(run_dir: Path) -> None:
    """1,500 bad requests and slow clients write a few lines, not one per request."""
    log = run_dir / "serve-logflood.log"
    server = Server(run_dir, log, "--header-timeout-s=0.5", "--max-connections=64")
    try:
        for i in range(1500):
            s = _connect(server.port)
            try:
                s.sendall(
                    [b"GARBAGE\r\n\r\n", b"POST /predict HTTP/1.1\r\nContent-Length: x\r\n\r\n"][
                        i % 2
                    ]
                )
                assert _read_until_closed(s).startswith(b"HTTP/1.1 400")
            finally:
                s.close()
        # Over the cap: each new one closes the oldest idle one (reset when it then sends),
        # and the rest time out halfway through their headers (408).
        slow = [_connect(server.port) for _ in range(100)]
        try:
            for s in slow:
                with contextlib.suppress(ConnectionError):
                    s.sendall(b"GET /health HTTP/1.1\r\n")
            for s in slow:
                with contextlib.suppress(ConnectionError):
                    _read_until_closed(s)
        finally:
            for s in slow:
                s.close()
        assert _health(server.port) == 200
    finally:
        assert server.close() == 0
    text = log.read_text()
    assert "refused a request: 400" in text
    assert len(text.encode()) < 4000, f"{len(text.encode())} bytes of log:\n{text[:2000]}"


def test_max_body_mb_admits_the_default_jobs_64_examples(run_dir: Path, tmp_path: Path) -> None:
    """64 examples of 1x32x32 (about 1.36 MB of JSON): 413 by default, 200 with --max-body-mb 4."""
    x = torch.rand(64, 1, 32, 32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    assert 1_200_000 < len(body) < 4 << 20, len(body)
    with torch.inference_mode():
        want = torch.softmax(load_model(run_dir)(x), dim=-1)
    for extra, status in ((), 413), (("--max-body-mb", "4"), 200):
        server = Server(run_dir, tmp_path / f"serve-{status}.log", *extra)
        try:
            got, answer, _ = server.request("POST", "/predict", body)
        finally:
            assert server.close() == 0
        assert got == status, answer[:200]
    outputs = json.loads(answer)["outputs"]
    probs = torch.tensor([o["probabilities"] for o in outputs])
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--port", "-1", "0..65535"),
        ("--port", "70000", "0..65535"),
        ("--host", "999.1.1.1", "not an IP address"),
        ("--host", "no such host!", "not an IP address"),
        ("--timeout-s", "nan", "--timeout-s"),
        ("--timeout-s", "-1", "--timeout-s"),
        ("--idle-timeout-s", "inf", "--idle-timeout-s"),
        ("--max-body-mb", "0", "--max-body-mb"),
        ("--max-connections", "0", "--max-connections"),
        ("--max-delay-ms", "nan", "--max-delay-ms"),
    ],
)
def test_bad_options_are_one_line_exit_2_before_loading(
    tmp_path: Path, option: str, value: str, says: str
) -> None:
    """Checked before the target is read: the missing target is never mentioned."""
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "serve", str(tmp_path / "missing"), option, value],
        capture_output=True,
        text=True,
        timeout=120,
        env=kiln_env(),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "missing" not in lines[0] and "Traceback" not in proc.stderr

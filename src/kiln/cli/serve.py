"""``kiln serve TARGET...``: answer predictions over HTTP with dynamic batching.

TARGET is a run directory (the eager model from ``model.safetensors``), several run directories
(one mean-probability ensemble), or an exported ``.pt2`` / ``.onnx`` file. ``--tta flip,shift``
averages test-time views and ``--compile`` compiles an eager model. The server binds, loads and
warms the model, then prints one line with its URL (``--port 0`` picks a free port) and serves
until SIGTERM or Ctrl-C, which stop accepting, finish every queued and in-flight request and
exit 0. ``--workers N`` starts N server processes on one port (``SO_REUSEPORT``: the kernel
spreads connections over them), each with its own model, batcher and metrics; this process
supervises them and forwards the signal. See ``docs/serving.md``.

Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_serve(["runs/digits"], host="127.0.0.1", port=0, max_batch=32,
    ...           max_delay_ms=0.0, queue_size=1024, timeout_s=10.0)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from types import FrameType

__all__ = ["run_serve"]


def _signals(stop: threading.Event) -> dict[int, object]:
    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}


def run_serve(
    targets: list[str],
    *,
    host: str,
    port: int,
    max_batch: int,
    max_delay_ms: float,
    queue_size: int,
    timeout_s: float,
    workers: int = 1,
    tta: str | None = None,
    compile: bool = False,
    reuse_port: bool = False,
    threads: int | None = None,
    batcher: str = "loop",
) -> None:
    """Serve ``targets`` until SIGTERM/SIGINT, then drain and return.

    Raises:
        FileNotFoundError: a target or its data description is missing.
        ValueError: an unsupported target or task, or bad batching options.
        RuntimeError: a worker process failed to start or died.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if workers > 1:
        _supervise(
            targets,
            host=host,
            port=port,
            workers=workers,
            threads=threads,
            extra=[
                f"--max-batch={max_batch}",
                f"--max-delay-ms={max_delay_ms}",
                f"--queue-size={queue_size}",
                f"--timeout-s={timeout_s}",
                *([f"--tta={tta}"] if tta else []),
                *(["--compile"] if compile else []),
                f"--batcher={batcher}",
            ],
        )
        return
    import torch

    from kiln.deploy.serve import ModelServer, load_backend

    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    backend = load_backend(targets, tta=tta, compile=compile)
    server = ModelServer(
        backend,
        host=host,
        port=port,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        queue_size=queue_size,
        timeout_s=timeout_s,
        reuse_port=reuse_port,
        batcher=batcher,
    )
    stop = threading.Event()
    old = _signals(stop)
    try:
        server.start()
        name = " ".join(targets)
        print(f"serving {name} ({backend.kind}) on {server.url} (ready)", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: finishing in-flight requests", file=sys.stderr, flush=True)
        if not server.shutdown():
            print("warning: some requests did not finish in time", file=sys.stderr, flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
    print("stopped", file=sys.stderr, flush=True)


def _supervise(
    targets: list[str],
    *,
    host: str,
    port: int,
    workers: int,
    threads: int | None,
    extra: list[str],
) -> None:
    """Start ``workers`` server processes on one port, wait for SIGTERM, stop them all."""
    from kiln.deploy.serve_http import bind_socket

    # Hold the port (bound with SO_REUSEPORT, never listening, so it gets no connections)
    # until every worker has bound it: port 0 then means one free port for all of them.
    holder = bind_socket(host, port, reuse_port=True, listen=False)
    port = holder.getsockname()[1]
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "kiln", "serve", *targets, f"--host={host}", f"--port={port}"]
    cmd.append(f"--threads={threads}")
    procs = [
        subprocess.Popen([*cmd, "--reuse-port", *extra], stdout=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    stop = threading.Event()
    old = _signals(stop)
    try:
        kind = ""
        for proc in procs:  # each prints one line when it is ready
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"\((.+)\) on http", line)
            if not m:
                raise RuntimeError(f"a worker failed to start (exit {proc.wait()}); see above")
            kind = m.group(1)
        holder.close()
        url = f"http://{host}:{port}"
        name = " ".join(targets)
        print(f"serving {name} ({kind}) on {url} (ready) in {workers} workers", flush=True)
        while not stop.wait(0.5):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited with status {dead[0].returncode}")
        print(f"stopping {workers} workers", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in procs]
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        holder.close()
    if any(codes):
        raise RuntimeError(f"workers exited with {codes}")
    print("stopped", file=sys.stderr, flush=True)

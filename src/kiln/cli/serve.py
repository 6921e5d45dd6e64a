"""``kiln serve TARGET``: answer predictions over HTTP with dynamic batching.

TARGET is a run directory (the eager model from ``model.safetensors``) or an exported ``.pt2`` /
``.onnx`` file. The server binds, loads and warms the model, then prints one line with its URL
(``--port 0`` picks a free port) and serves until SIGTERM or Ctrl-C, which stop accepting,
finish every queued and in-flight request and exit 0. See ``docs/serving.md``.

Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_serve("runs/digits", host="127.0.0.1", port=0, max_batch=32,
    ...           max_delay_ms=0.0, queue_size=1024, timeout_s=10.0)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

__all__ = ["run_serve"]


def run_serve(
    target: str,
    *,
    host: str,
    port: int,
    max_batch: int,
    max_delay_ms: float,
    queue_size: int,
    timeout_s: float,
) -> None:
    """Serve ``target`` until SIGTERM/SIGINT, then drain and return.

    Raises:
        FileNotFoundError: the target or its data description is missing.
        ValueError: an unsupported target or task, or bad batching options.
    """
    from kiln.deploy.serve import ModelServer, load_backend

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    backend = load_backend(target)
    server = ModelServer(
        backend,
        host=host,
        port=port,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        queue_size=queue_size,
        timeout_s=timeout_s,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"serving {target} ({backend.kind}) on {server.url} (ready)", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: finishing in-flight requests", file=sys.stderr, flush=True)
        if not server.shutdown():
            print("warning: some requests did not finish in time", file=sys.stderr, flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print("stopped", file=sys.stderr, flush=True)

"""An HTTP JSON model server with dynamic batching, on the standard library only.

Endpoints: ``POST /predict`` (``{"inputs": [...]}``, one example or a list of examples),
``GET /health`` (alive), ``GET /ready`` (model loaded and warmed up), ``GET /metrics``
(Prometheus text) and ``GET /openapi.json``. Requests go through a bounded queue to one
batching worker (:mod:`kiln.deploy.serve_batcher`); a full queue answers 503 with
``Retry-After``, a request that waits past its timeout 504. Bad input gets a 4xx that says
what was expected; no request can produce an unhandled error or stop the server.

Example:
    >>> backend = load_backend("runs/digits")                      # doctest: +SKIP
    >>> server = ModelServer(backend, port=0).start()               # doctest: +SKIP
    >>> server.url                                                  # doctest: +SKIP
    'http://127.0.0.1:40123'
    >>> server.shutdown()                                           # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from kiln.deploy.serve_backends import Backend, load_backend
from kiln.deploy.serve_batcher import Batcher, QueueFull
from kiln.deploy.serve_inputs import (
    MAX_BODY,
    RequestError,
    format_outputs,
    openapi,
    parse_inputs,
)
from kiln.deploy.serve_metrics import ServeMetrics

__all__ = ["Backend", "ModelServer", "RequestError", "load_backend", "parse_inputs"]

log = logging.getLogger("kiln.serve")


_ROUTES = {
    "/predict": "POST",
    "/health": "GET",
    "/ready": "GET",
    "/metrics": "GET",
    "/openapi.json": "GET",
}


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every request is answered, whatever it holds."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _HTTPServer
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet access log (``kiln.serve`` at debug level)."""
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Write one full response."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        """Write a JSON response."""
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _dispatch(self, method: str) -> None:
        """Route one request, time it, count it and never let an exception escape."""
        app = self.server.app
        start = time.perf_counter()
        status = 500
        app.enter_request()  # counted until the answer is written, so a drain waits for it
        path = self.path.split("?", 1)[0]
        try:
            want = _ROUTES.get(path)
            if want is None:
                raise RequestError(404, f"no such path {path}; see /openapi.json")
            if method != want:
                self._drop_body()
                status = 405
                self._json(405, {"error": f"{path} accepts {want} only"}, {"Allow": want})
                return
            status, obj, ctype, headers = app.handle(path, self)
            if not isinstance(obj, bytes):
                self._json(status, obj, headers)
            else:
                self._send(status, obj, ctype, headers)
        except RequestError as exc:
            status = exc.status
            app.metrics.observe_error(_ERROR_KIND.get(status, "client"))
            extra = {"Retry-After": "1"} if status == 503 else None
            self._safe_json(status, {"error": exc.message}, extra)
        except Exception:
            status = 500
            app.metrics.observe_error("internal")
            log.exception("request failed")
            self.close_connection = True
            self._safe_json(500, {"error": "internal error; see the server log"})
        finally:
            app.metrics.observe_request(status, time.perf_counter() - start)
            app.leave_request()

    def _safe_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        """Send an error answer, ignoring a client that already went away."""
        try:
            self._json(status, obj, headers)
        except OSError:
            self.close_connection = True

    def _drop_body(self) -> None:
        """Skip a small body so the connection stays usable; close it otherwise."""
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if 0 <= n <= MAX_BODY:
            self.rfile.read(n)
        else:
            self.close_connection = True

    def read_json(self) -> Any:
        """The request body parsed as JSON, after the size checks.

        Raises:
            RequestError: 411 without Content-Length, 413 over the limit, 400 invalid JSON.
        """
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(raw)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {raw!r}") from None
        if n < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {raw!r}")
        if n > MAX_BODY:
            self.close_connection = True
            raise RequestError(413, f"body of {n} bytes is over the {MAX_BODY}-byte limit")
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise RequestError(400, "body shorter than Content-Length")
        if not data.strip():
            raise RequestError(400, 'empty body; send JSON {"inputs": [...]}')
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise RequestError(400, f"invalid JSON: {exc}") from None

    def do_GET(self) -> None:
        """GET."""
        self._dispatch("GET")

    def do_POST(self) -> None:
        """POST."""
        self._dispatch("POST")

    def do_PUT(self) -> None:
        """PUT (405 on known paths)."""
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        """DELETE (405 on known paths)."""
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        """PATCH (405 on known paths)."""
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        """HEAD (405 on known paths)."""
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        """OPTIONS (405 on known paths)."""
        self._dispatch("OPTIONS")


_ERROR_KIND = {
    400: "invalid_json",
    404: "not_found",
    411: "length_required",
    413: "too_large",
    422: "validation",
    503: "overloaded",
    504: "timeout",
}


def _reject_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


class _HTTPServer(ThreadingHTTPServer):
    """A threading server that knows its :class:`ModelServer`."""

    daemon_threads = True
    request_queue_size = 256
    app: ModelServer


class ModelServer:
    """The model, its batcher, metrics and the HTTP server around them."""

    def __init__(
        self,
        backend: Backend,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 32,
        max_delay_ms: float = 0.0,
        queue_size: int = 1024,
        timeout_s: float = 10.0,
    ) -> None:
        """Bind the socket (``port=0`` picks a free one); :meth:`start` serves.

        Raises:
            ValueError: a non-positive batch, queue or timeout, or a negative delay.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s}")
        self.backend = backend
        self.timeout_s = timeout_s
        self.metrics = ServeMetrics()
        self.batcher = Batcher(
            backend.predict,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            queue_size=queue_size,
            on_batch=self.metrics.observe_batch,
        )
        self.ready = False
        self.stopping = False
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._openapi = json.dumps(openapi(backend.info)).encode()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def warm_up(self) -> None:
        """One forward pass at batch 1 and at ``max_batch``, then freeze the garbage collector."""
        shape = self.backend.info.input_shape
        with torch.inference_mode():
            for n in sorted({1, self.batcher.max_batch}):
                self.backend.predict(torch.zeros(n, *shape))
        gc.collect()
        gc.freeze()
        self.ready = True

    def start(self) -> ModelServer:
        """Warm up, start the batcher and serve in a background thread; returns ``self``."""
        self.batcher.start()
        self.warm_up()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name="kiln-serve-http",
        )
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish queued and in-flight requests, close; True if all finished."""
        wait = self.timeout_s + 5.0 if timeout is None else timeout
        self.stopping = True
        self.httpd.shutdown()
        deadline = time.monotonic() + wait
        ok = self.batcher.drain(wait)
        with self._inflight_cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    ok = False
                    break
                self._inflight_cond.wait(left)
        self.batcher.stop(1.0)
        self.httpd.server_close()
        return ok

    def handle(self, path: str, req: _Handler) -> tuple[int, Any, str, dict[str, str] | None]:
        """Answer one routed request: ``(status, body, content type, headers)``."""
        if path == "/predict":
            return self._predict(req)
        if path == "/health":
            return 200, {"status": "ok"}, "application/json", None
        if path == "/ready":
            if self.ready and not self.stopping:
                return 200, {"status": "ready"}, "application/json", None
            return (
                503,
                {"status": "stopping" if self.stopping else "loading"},
                "application/json",
                {"Retry-After": "1"},
            )
        if path == "/metrics":
            text = self.metrics.render(queue_depth=self.batcher.depth)
            return 200, text.encode(), "text/plain; version=0.0.4; charset=utf-8", None
        return 200, self._openapi, "application/json", None

    def _predict(self, req: _Handler) -> tuple[int, Any, str, dict[str, str] | None]:
        """Validate, queue, wait for the batch's answer."""
        # In-flight accounting is in _Handler._dispatch: it must cover writing the answer.
        body = req.read_json()
        if self.stopping:
            req.close_connection = True
            raise RequestError(503, "the server is shutting down")
        x, _ = parse_inputs(body, self.backend.info.input_shape)
        try:
            future = self.batcher.submit(x)
        except QueueFull as exc:
            raise RequestError(503, str(exc)) from None
        try:
            out = future.result(timeout=self.timeout_s)
        except (FutureTimeout, CancelledError):
            future.cancel()
            raise RequestError(504, f"no answer within {self.timeout_s:g} s") from None
        return (
            200,
            {"outputs": format_outputs(out, self.backend.info)},
            "application/json",
            None,
        )

    def enter_request(self) -> None:
        """Count a request as in flight (``shutdown`` waits until none is)."""
        with self._inflight_cond:
            self._inflight += 1

    def leave_request(self) -> None:
        """A request's answer has been written."""
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

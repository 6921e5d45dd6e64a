"""An HTTP JSON model server with dynamic batching, on the standard library only.

Endpoints: ``POST /predict`` (``{"inputs": [...]}``, one example or a list of examples),
``GET /health`` (alive), ``GET /ready`` (model loaded and warmed up), ``GET /metrics``
(Prometheus text) and ``GET /openapi.json``. Requests go through a bounded queue to a
batcher (:mod:`kiln.deploy.serve.batcher`: on the event loop, or on a worker thread); a full
queue answers 503 with ``Retry-After``, a request that waits past its timeout 504. Bad input
gets a 4xx that says what was expected; no request can produce an unhandled error or stop the
server.

Example:
    >>> backend = load_backend("runs/digits")                      # doctest: +SKIP
    >>> server = ModelServer(backend, port=0).start()               # doctest: +SKIP
    >>> server.url                                                  # doctest: +SKIP
    'http://127.0.0.1:40123'
    >>> server.shutdown()                                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any

import torch

from kiln.deploy.serve.backends import Backend, load_backend
from kiln.deploy.serve.batcher import Batcher, LoopBatcher, QueueFull
from kiln.deploy.serve.http import HTTPFront, Limits, Request, Response, bind_socket
from kiln.deploy.serve.inputs import (
    RequestError,
    format_outputs,
    openapi,
    parse_inputs,
)
from kiln.deploy.serve.log import RateLimitedLog
from kiln.deploy.serve.metrics import ServeMetrics
from kiln.deploy.serve.validate import InputError, decode_json
from kiln.errors import UsageError

__all__ = ["Backend", "Limits", "ModelServer", "RequestError", "load_backend", "parse_inputs"]

log = logging.getLogger("kiln.serve")


_ROUTES = {
    "/predict": "POST",
    "/health": "GET",
    "/ready": "GET",
    "/metrics": "GET",
    "/openapi.json": "GET",
}


_ERROR_KIND = {
    400: "invalid_json",
    404: "not_found",
    408: "request_timeout",
    411: "length_required",
    413: "too_large",
    422: "validation",
    503: "overloaded",
    504: "timeout",
}


class ModelServer:
    """The model, its batcher, metrics and the HTTP front end around them.

    The front end (:mod:`kiln.deploy.serve.http`) runs an asyncio loop in a background thread;
    the batcher runs the model in its own thread.
    """

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
        reuse_port: bool = False,
        batcher: str = "loop",
        limits: Limits | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        """Bind the socket (``port=0`` picks a free one); :meth:`start` serves.

        Args:
            reuse_port: let several processes bind the same port (``SO_REUSEPORT``); the kernel
                spreads new connections over them (``kiln serve --workers N``).
            batcher: ``loop`` runs batches on the event loop (fastest for small models),
                ``thread`` on a worker thread (parsing overlaps a large model's forward pass).
            limits: body size, connection cap and read/idle timeouts of the HTTP front end
                (:class:`kiln.deploy.serve.http.Limits`; its defaults when None).
            log_interval_s: repeated errors of one kind are logged once per this many seconds,
                with the number dropped in between.

        Raises:
            UsageError: a non-positive batch, queue or timeout, or a negative delay.
        """
        if not 0 < timeout_s < float("inf"):  # False for NaN too
            raise UsageError(f"timeout_s must be a finite number > 0; got {timeout_s}")
        self.backend = backend
        self.timeout_s = timeout_s
        self.metrics = ServeMetrics()
        if batcher not in ("loop", "thread"):
            raise ValueError(f"batcher must be 'loop' or 'thread', got {batcher!r}")
        self.batcher: Batcher | LoopBatcher = (LoopBatcher if batcher == "loop" else Batcher)(
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
        self.limits = limits or Limits()
        self.log = RateLimitedLog(log, log_interval_s)
        self._openapi = json.dumps(openapi(backend.info, self.limits.max_body)).encode()
        # The process id tells the workers of `kiln serve --workers N` apart.
        self._health = json.dumps({"status": "ok", "pid": os.getpid()}).encode()
        self.sock = bind_socket(host, port, reuse_port=reuse_port)
        self.front = HTTPFront(
            self._dispatch,
            self.sock,
            self.limits,
            on_rejected=self._rejected,
            after_write=self._written,
            on_event=self.log.warning,
        )
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.sock.getsockname()[:2]
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
        self.loop.run_until_complete(self.front.start())
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="kiln-serve-http"
        )
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish queued and in-flight requests, close; True if all finished."""
        wait = self.timeout_s + 5.0 if timeout is None else timeout
        self.stopping = True
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(self.front.stop_accepting(), self.loop).result(5)
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
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.front.close_all)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        self.sock.close()
        return ok

    # ------------------------------------------------------------------ requests

    def _rejected(self, status: int, message: str) -> None:
        """A request refused while reading (oversized, chunked, malformed, too slow, over cap)."""
        self.metrics.observe_error(_ERROR_KIND.get(status, "client"))
        self.metrics.observe_request(status, 0.0)
        self.log.warning(str(status), f"refused a request: {status} {message}")

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's error report (e.g. accept() out of file descriptors), rate-limited."""
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        kind = f"loop:{message}:{type(exc).__name__}"
        self.log.warning(kind, f"event loop: {message}", exc_info=exc)

    def _written(self, req: Request, resp: Response) -> None:
        """The answer is handed to the socket: the request is no longer in flight."""
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

    async def _dispatch(self, req: Request) -> Response:
        """Route one request, time it, count it and never let an exception escape."""
        start = time.perf_counter()
        with self._inflight_cond:
            self._inflight += 1  # until the answer is written, so a drain waits for it
        status = 500
        try:
            want = _ROUTES.get(req.path)
            if want is None:
                raise RequestError(404, f"no such path {req.path}; see /openapi.json")
            if req.method != want:
                status = 405
                body = json.dumps({"error": f"{req.path} accepts {want} only"}).encode()
                return Response(405, body, headers={"Allow": want})
            resp = await self._route(req)
            status = resp.status
            return resp
        except RequestError as exc:
            status = exc.status
            self.metrics.observe_error(_ERROR_KIND.get(status, "client"))
            extra = {"Retry-After": "1"} if status == 503 else {}
            body = json.dumps({"error": exc.message}).encode()
            return Response(status, body, headers=extra, close=status == 503 and self.stopping)
        except Exception:
            status = 500
            self.metrics.observe_error("internal")
            self.log.warning("internal", "request failed", exc_info=True)
            body = b'{"error": "internal error; see the server log"}'
            return Response(500, body, close=True)
        finally:
            self.metrics.observe_request(status, time.perf_counter() - start)

    async def _route(self, req: Request) -> Response:
        """Answer a routed request whose method matches."""
        if req.path == "/predict":
            return await self._predict(req)
        if req.path == "/health":
            return Response(200, self._health)
        if req.path == "/ready":
            if self.ready and not self.stopping:
                return Response(200, b'{"status": "ready"}')
            state = b'{"status": "stopping"}' if self.stopping else b'{"status": "loading"}'
            return Response(503, state, headers={"Retry-After": "1"})
        if req.path == "/metrics":
            text = self.metrics.render(queue_depth=self.batcher.depth)
            return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        return Response(200, self._openapi)

    async def _predict(self, req: Request) -> Response:
        """Validate, queue, await the batch's answer."""
        if self.stopping:
            raise RequestError(503, "the server is shutting down")
        if req.body is None:
            raise RequestError(411, "Content-Length is required")
        try:
            body = decode_json(req.body)
        except InputError as exc:
            raise RequestError(exc.status, str(exc)) from None
        no_bools = b"true" not in req.body and b"false" not in req.body
        x, _ = parse_inputs(body, self.backend.info.input_shape, fast=no_bools)
        try:
            future = self.batcher.submit(x)
        except QueueFull as exc:
            raise RequestError(503, str(exc)) from None
        waiter = asyncio.wrap_future(future) if isinstance(future, Future) else future
        try:
            out = await asyncio.wait_for(waiter, self.timeout_s)
        except (asyncio.TimeoutError, CancelledError, asyncio.CancelledError):
            future.cancel()
            raise RequestError(504, f"no answer within {self.timeout_s:g} s") from None
        return Response(
            200, json.dumps({"outputs": format_outputs(out, self.backend.info)}).encode()
        )

"""A small HTTP/1.1 front end on asyncio for :mod:`kiln.deploy.serve.server`.

Why not ``http.server``: its ``ThreadingHTTPServer`` spends a thread per connection and parses
headers with the ``email`` package; under 32 concurrent keep-alive clients those threads and the
model's batching thread fight for the GIL, and the p99 latency grows with them. Here one event
loop reads every connection, parses the request line and headers by hand (what a JSON API needs:
``Content-Length`` bodies, keep-alive, ``Connection: close``) and hands complete requests to an
``async`` handler; the model runs in the batcher's own thread, where torch releases the GIL.

What it enforces (:class:`Limits`), before the handler sees a request: a header block of at most
64 KiB (431), no chunked bodies (411), a ``Content-Length`` at most ``max_body`` (413, answered
without reading the body), one request at a time per connection (pipelined requests wait their
turn, in order); a request's header block must arrive within ``header_timeout_s`` and its body
within ``body_timeout_s`` of the header (else 408), and an idle keep-alive connection is closed
after ``idle_timeout_s``. At most ``max_connections`` connections are open: one more closes the
oldest idle connection, or, when none is idle, is answered 503 and closed, so ``/health`` keeps
answering under a flood of idle sockets.

Every close after an answer is graceful: the answer is written, the write side shut down (the
client sees the answer, then end of file), and what the client still sends is read and dropped,
up to ``drain_bytes`` and ``drain_timeout_s``. Closing with unread bytes in the socket would make
the kernel send a reset, and a client still uploading an oversized body would get "connection
reset" instead of the 413.

Example:
    >>> async def echo(req: Request) -> Response:
    ...     return Response(200, req.body or b"{}", "application/json")
    >>> import socket; sock = bind_socket("127.0.0.1", 0)
    >>> front = HTTPFront(echo, sock, Limits(max_body=1024))       # doctest: +SKIP
    >>> sock.close()
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kiln.errors import PortError

__all__ = ["HTTPFront", "Limits", "Request", "Response", "bind_socket"]

MAX_HEADER = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server: bytes, connections and time.

    Attributes:
        max_body: the largest accepted body, in bytes (413 beyond).
        max_connections: open connections at most (the oldest idle one is closed for a new one;
            503 when none is idle).
        header_timeout_s: from a request's first byte to the end of its header block (408).
        body_timeout_s: from the end of the header block to the end of the body (408).
        idle_timeout_s: how long a keep-alive connection may wait for its next request.
        drain_bytes: the most bytes read and dropped while closing after an answer.
        drain_timeout_s: the longest wait for the client to finish sending while closing.
    """

    max_body: int = 1 << 20
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    drain_bytes: int = 16 << 20
    drain_timeout_s: float = 5.0

    @property
    def tick_s(self) -> float:
        """How often the deadlines are checked: a quarter of the shortest, within 20 ms..1 s."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s)
        return min(1.0, max(0.02, min(shortest, self.drain_timeout_s) / 4))


@dataclass
class Request:
    """One parsed request; ``body`` is None when the request had no ``Content-Length``."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    keep_alive: bool


@dataclass
class Response:
    """What a handler returns; ``close`` ends the connection after it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False


Handler = Callable[[Request], Awaitable[Response]]


def bind_socket(
    host: str, port: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A listening TCP socket (``port=0`` picks a free one; ``reuse_port`` lets processes share it).

    ``listen=False`` only binds: the port is held, and gets no connections.

    Example:
        >>> s = bind_socket("127.0.0.1", 0); s.getsockname()[1] > 0
        True
        >>> s.close()
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
            "(0 = any free port) or --host"
        ) from None
    if listen:
        sock.listen(1024)
        sock.setblocking(False)
    return sock


def render(resp: Response, *, head: bool = False) -> bytes:
    """The response's bytes: status line, headers, body (none for HEAD)."""
    lines = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
    ]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    if resp.close:
        lines.append("Connection: close")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + resp.body


class _Connection(asyncio.Protocol):
    """One client connection: buffer bytes, cut complete requests, answer them in order.

    Its state is ``idle`` (no request begun), ``reading`` (part of a request is here), ``busy``
    (the handler is answering) or ``closing`` (answered, write side shut, draining);
    ``deadline`` is when the current state times out (none while busy).
    """

    def __init__(self, front: HTTPFront) -> None:
        self.front = front
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.state = "idle"
        self.in_body = False
        self.deadline: float | None = None
        self.drained = 0
        self.eof = False
        self.task: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self.state == "busy"

    @property
    def closed(self) -> bool:
        """True once no further request will be read (closing or gone)."""
        return self.state == "closing"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        front = self.front
        if len(front.connections) >= front.limits.max_connections:
            oldest = next(iter(front.idle), None)
            if oldest is None:
                front.connections.add(self)  # counted until _close_gracefully moves it
                self._fail(503, "too many open connections; retry later", retry_after=True)
                return
            oldest.abandon()
            front.on_event("evicted", "connection cap reached: closed the oldest idle connection")
        front.connections.add(self)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closing"
        self.deadline = None
        self.front.forget(self)

    def eof_received(self) -> bool | None:
        # The client will send nothing more; an answer in progress is still written, then the
        # connection closes (returning True keeps the write side open for it).
        self.eof = True
        if self.state == "busy":
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self.state == "closing":
            # Read and drop what the client still sends, so it sees the answer, not a reset.
            self.drained += len(data)
            if self.drained > self.front.limits.drain_bytes and self.transport is not None:
                self.transport.close()
            return
        self.buf += data
        if self.state == "idle":
            self.state = "reading"
            self.in_body = False
            self.deadline = time.monotonic() + self.front.limits.header_timeout_s
            self.front.idle.pop(self, None)
        if self.state == "reading":
            self._next()

    def _idle(self) -> None:
        """Wait for the next request (the oldest idle connection is the first to be closed)."""
        self.state = "idle"
        self.deadline = time.monotonic() + self.front.limits.idle_timeout_s
        self.front.idle[self] = None

    def abandon(self) -> None:
        """Close an idle connection at once (no request was begun, so there is nothing to say)."""
        self.state = "closing"
        self.front.forget(self)
        if self.transport is not None:
            self.transport.close()

    def expire(self, now: float) -> None:
        """Called by the front's timer: act on a passed deadline."""
        if self.deadline is None or now < self.deadline:
            return
        if self.state == "idle":
            self.abandon()
        elif self.state == "reading":
            what = "body" if self.in_body else "request headers"
            limit = (
                self.front.limits.body_timeout_s
                if self.in_body
                else self.front.limits.header_timeout_s
            )
            self._fail(408, f"the {what} did not arrive within {limit:g} s")
        elif self.state == "closing" and self.transport is not None:
            self.transport.close()  # the client did not finish within the drain timeout

    def _fail(self, status: int, message: str, *, retry_after: bool = False) -> None:
        """Answer a request that cannot be read or served, then close the connection."""
        body = ('{"error": "' + message.replace('"', "'") + '"}').encode()
        headers = {"Retry-After": "1"} if retry_after else {}
        self._write(Response(status, body, headers=headers, close=True))
        self.front.on_rejected(status, message)

    def _write(self, resp: Response, head: bool = False) -> None:
        if self.transport is None or self.state == "closing":
            return
        self.transport.write(render(resp, head=head))
        if resp.close:
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Shut the write side after the answer; drop what still comes, within bounds; close."""
        self.state = "closing"
        self.buf.clear()
        self.front.forget(self)
        self.front.closing.add(self)
        self.deadline = time.monotonic() + self.front.limits.drain_timeout_s
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()  # FIN after the answer: the client reads it, then EOF
        else:
            self.transport.close()

    def _next(self) -> None:
        """Start the next complete request in the buffer, if there is one."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER:
                self._fail(431, f"request headers over {MAX_HEADER} bytes")
            return
        try:
            head = bytes(self.buf[:end]).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ", 2)
        except ValueError:
            self._fail(400, "malformed request line")
            return
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400, "malformed header line")
                return
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._fail(411, "chunked bodies are not supported; send Content-Length")
            return
        body: bytes | None = None
        size = 0
        raw = headers.get("content-length")
        if raw is not None:
            try:
                size = int(raw)
                if size < 0:
                    raise ValueError
            except ValueError:
                self._fail(400, f"bad Content-Length {raw[:40]!r}")
                return
            limit = self.front.limits.max_body
            if size > limit:
                self._fail(413, f"body of {size} bytes is over the {limit}-byte limit")
                return
            if len(self.buf) < end + 4 + size:
                if not self.in_body:  # the header block is complete: the body's clock starts
                    self.in_body = True
                    self.deadline = time.monotonic() + self.front.limits.body_timeout_s
                return  # wait for the rest of the body
            body = bytes(self.buf[end + 4 : end + 4 + size])
        del self.buf[: end + 4 + size]
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        request = Request(method, target.split("?", 1)[0], headers, body, keep)
        self.state = "busy"
        self.deadline = None
        self.task = asyncio.ensure_future(self._answer(request))  # kept: tasks are weak refs

    async def _answer(self, request: Request) -> None:
        resp = await self.front.handler(request)
        if not request.keep_alive or self.eof:
            resp.close = True
        self._write(resp, head=request.method == "HEAD")
        self.front.after_write(request, resp)
        if self.state == "busy":
            if self.transport is None or self.transport.is_closing():
                self.state = "closing"
                return
            if self.buf:  # a pipelined request is already (partly) here
                self.state = "reading"
                self.in_body = False
                self.deadline = time.monotonic() + self.front.limits.header_timeout_s
                self._next()
            else:
                self._idle()


class HTTPFront:
    """Serves ``handler`` on ``sock`` from an event loop (the caller runs the loop).

    Args:
        handler: ``async (Request) -> Response``; it must not raise.
        sock: a listening socket from :func:`bind_socket`.
        limits: body size, connection count and timeouts (:class:`Limits`).
        on_rejected: called with the status and message of a request refused while reading.
        after_write: called with each answered request and its response.
        on_event: called with a kind and a message for events worth a (rate-limited) log line.
    """

    def __init__(
        self,
        handler: Handler,
        sock: socket.socket,
        limits: Limits | None = None,
        *,
        on_rejected: Callable[[int, str], None] = lambda status, message: None,
        after_write: Callable[[Request, Response], None] = lambda req, resp: None,
        on_event: Callable[[str, str], object] = lambda kind, message: None,
    ) -> None:
        self.handler = handler
        self.sock = sock
        self.limits = limits or Limits()
        self.on_rejected = on_rejected
        self.after_write = after_write
        self.on_event = on_event
        self.connections: set[_Connection] = set()  # open, not closing: what the cap counts
        self.idle: dict[_Connection, None] = {}  # idle ones, oldest first
        self.closing: set[_Connection] = set()  # answered and draining
        self.server: asyncio.base_events.Server | None = None
        self._timer: asyncio.Task[None] | None = None

    def forget(self, conn: _Connection) -> None:
        """``conn`` no longer counts against the cap (closing or gone)."""
        self.connections.discard(conn)
        self.idle.pop(conn, None)
        if conn.transport is None or conn.transport.is_closing():
            self.closing.discard(conn)

    async def start(self) -> None:
        """Start accepting connections and the timer that enforces the timeouts."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), sock=self.sock)
        self._timer = asyncio.ensure_future(self._expire_forever())

    async def _expire_forever(self) -> None:
        """Every tick, close what has waited too long (one sweep over the open connections)."""
        tick = self.limits.tick_s
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for conn in [*self.connections, *self.closing]:
                conn.expire(now)

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay until :meth:`close_all`."""
        if self.server is not None:
            self.server.close()

    def close_all(self) -> None:
        """Close every connection (idle keep-alive ones included) and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        for conn in [*self.connections, *self.closing]:
            if conn.transport is not None:
                conn.transport.close()

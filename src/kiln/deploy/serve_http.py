"""A small HTTP/1.1 front end on asyncio for :mod:`kiln.deploy.serve`.

Why not ``http.server``: its ``ThreadingHTTPServer`` spends a thread per connection and parses
headers with the ``email`` package; under 32 concurrent keep-alive clients those threads and the
model's batching thread fight for the GIL, and the p99 latency grows with them. Here one event
loop reads every connection, parses the request line and headers by hand (what a JSON API needs:
``Content-Length`` bodies, keep-alive, ``Connection: close``) and hands complete requests to an
``async`` handler; the model runs in the batcher's own thread, where torch releases the GIL.

What it enforces, before the handler sees a request: a header block of at most 64 KiB (431), no
chunked bodies (411), a ``Content-Length`` at most ``max_body`` (413, answered without reading the
body, then the connection closes), one request at a time per connection (pipelined requests
wait their turn, in order).

Example:
    >>> async def echo(req: Request) -> Response:
    ...     return Response(200, req.body or b"{}", "application/json")
    >>> import socket; sock = bind_socket("127.0.0.1", 0)
    >>> front = HTTPFront(echo, sock, max_body=1024)               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["HTTPFront", "Request", "Response", "bind_socket"]

MAX_HEADER = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


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
    sock.bind((host, port))
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
    """One client connection: buffer bytes, cut complete requests, answer them in order."""

    def __init__(self, front: HTTPFront) -> None:
        self.front = front
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, then close the connection."""
        body = ('{"error": "' + message.replace('"', "'") + '"}').encode()
        self.busy = True
        self._write(Response(status, body, close=True))
        self.front.on_rejected(status)

    def _write(self, resp: Response, head: bool = False) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(render(resp, head=head))
        if resp.close:
            self.transport.close()
            self.closed = True

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
                self._fail(400, f"bad Content-Length {raw!r}")
                return
            if size > self.front.max_body:
                self._fail(
                    413, f"body of {size} bytes is over the {self.front.max_body}-byte limit"
                )
                return
            if len(self.buf) < end + 4 + size:
                return  # wait for the rest of the body
            body = bytes(self.buf[end + 4 : end + 4 + size])
        del self.buf[: end + 4 + size]
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        request = Request(method, target.split("?", 1)[0], headers, body, keep)
        self.busy = True
        self.task = asyncio.ensure_future(self._answer(request))  # kept: tasks are weak refs

    async def _answer(self, request: Request) -> None:
        resp = await self.front.handler(request)
        if not request.keep_alive:
            resp.close = True
        self._write(resp, head=request.method == "HEAD")
        self.front.after_write(request, resp)
        if not self.closed:
            self.busy = False
            if self.buf:
                self._next()


class HTTPFront:
    """Serves ``handler`` on ``sock`` from an event loop (the caller runs the loop).

    Args:
        handler: ``async (Request) -> Response``; it must not raise.
        sock: a listening socket from :func:`bind_socket`.
        max_body: the largest accepted body, in bytes.
        on_rejected: called with the status of a request refused while parsing.
        after_write: called with each answered request and its response.
    """

    def __init__(
        self,
        handler: Handler,
        sock: socket.socket,
        *,
        max_body: int,
        on_rejected: Callable[[int], None] = lambda status: None,
        after_write: Callable[[Request, Response], None] = lambda req, resp: None,
    ) -> None:
        self.handler = handler
        self.sock = sock
        self.max_body = max_body
        self.on_rejected = on_rejected
        self.after_write = after_write
        self.connections: set[_Connection] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Start accepting connections."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), sock=self.sock)

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay until :meth:`close_all`."""
        if self.server is not None:
            self.server.close()

    def close_all(self) -> None:
        """Close every connection (idle keep-alive ones included)."""
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

"""``kiln serve TARGET...``: answer predictions over HTTP with dynamic batching.

TARGET is a run directory (the eager model from ``model.safetensors``), several run directories
(one mean-probability ensemble), or an exported ``.pt2`` / ``.onnx`` / TorchScript ``.ts`` file.
``--tta flip,shift`` averages test-time views and ``--compile`` compiles an eager model. The
server binds, loads and warms the model, then prints one line with its URL (``--port 0`` picks
a free port) and serves until SIGTERM or Ctrl-C, which stop accepting, finish every queued and
in-flight request and exit 0. ``--workers N`` starts N server processes on one port
(``SO_REUSEPORT``: the kernel spreads connections over them), each with its own model, batcher
and metrics; this process supervises them and forwards the signal. See ``docs/serving.md``.

Every option is checked first (a port in 0..65535, a host that is an address or a name that
resolves, finite positive timeouts and sizes): a bad one is one line and exit 2, before torch or
the model is loaded. ``--max-connections``, ``--header-timeout-s``, ``--body-timeout-s``,
``--idle-timeout-s`` and ``--max-body-mb`` bound what a client may hold
(:class:`kiln.deploy.serve.http.Limits`).

Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_serve(["runs/digits"], host="127.0.0.1", port=0, max_batch=32,
    ...           max_delay_ms=0.0, queue_size=1024, timeout_s=10.0)   # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Annotated

import typer

from kiln.cli.common import Debug, TrustCode
from kiln.cli.errors import EXIT_USAGE
from kiln.errors import PortError, UsageError

__all__ = ["check_host", "check_port", "command", "register", "run_serve"]

_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def command(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="run directory (several = one ensemble), or an exported .pt2 / .onnx / "
            "TorchScript .ts"
        ),
    ],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port)")] = 8000,
    max_batch: Annotated[int, typer.Option(help="most requests per forward pass")] = 32,
    max_delay_ms: Annotated[
        float, typer.Option(help="longest wait for a fuller batch (0 = take what is queued)")
    ] = 0.0,
    queue_size: Annotated[int, typer.Option(help="bounded queue; 503 when full")] = 1024,
    timeout_s: Annotated[float, typer.Option(help="per-request timeout")] = 10.0,
    workers: Annotated[int, typer.Option(help="server processes sharing the port")] = 1,
    tta: Annotated[
        str | None, typer.Option(help="test-time augmentation: flip, vflip, shift, noise")
    ] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the eager model")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch intra-op threads per process (1 suits small models on busy hosts)"
        ),
    ] = None,
    batcher: Annotated[
        str, typer.Option(help="loop (batches on the event loop; default) or thread")
    ] = "loop",
    max_body_mb: Annotated[
        float, typer.Option(help="largest request body in MiB (413 beyond)")
    ] = 1.0,
    max_connections: Annotated[
        int, typer.Option(help="open connections at most (the oldest idle one is closed)")
    ] = 1024,
    header_timeout_s: Annotated[
        float, typer.Option(help="time to send a request's headers (408 after)")
    ] = 10.0,
    body_timeout_s: Annotated[
        float, typer.Option(help="time to send a request's body after its headers (408 after)")
    ] = 30.0,
    idle_timeout_s: Annotated[
        float, typer.Option(help="an idle keep-alive connection is closed after this")
    ] = 30.0,
    reuse_port: Annotated[bool, typer.Option(hidden=True)] = False,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Serve a trained run over HTTP with dynamic batching (/predict, /health, /ready, /metrics)."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_serve(
            targets,
            host=host,
            port=port,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            queue_size=queue_size,
            timeout_s=timeout_s,
            workers=workers,
            tta=tta,
            compile=compile,
            reuse_port=reuse_port,
            threads=threads,
            batcher=batcher,
            max_body_mb=max_body_mb,
            max_connections=max_connections,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
            idle_timeout_s=idle_timeout_s,
            trust_code=trust_code,
        ),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln serve`` to ``app``."""
    app.command("serve")(command)


def check_port(port: int) -> None:
    """Refuse a TCP port outside 0..65535 (0 picks a free one).

    Example:
        >>> check_port(8000)
    """
    if not 0 <= port <= 65535:
        raise PortError(f"--port {port} is not a TCP port; use 0..65535 (0 picks a free port)")


def check_host(host: str) -> None:
    """Refuse a host that is neither an IP address nor a name that resolves.

    Example:
        >>> check_host("127.0.0.1")
    """
    import socket

    shown = host if len(host) <= 60 else host[:57] + "..."
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    # Dotted digits that are not an address (999.1.1.1) are a typo, not a hostname to look up.
    if re.fullmatch(r"[0-9.]+", host) or ":" in host or not _HOSTNAME.fullmatch(host):
        raise PortError(
            f"--host {shown!r} is not an IP address or host name; "
            "use e.g. 127.0.0.1, 0.0.0.0 or ::1"
        )
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise PortError(
            f"--host {shown!r} does not resolve to an address; use an IP address such as 127.0.0.1"
        ) from None


def _check_options(ints: dict[str, int], floats: dict[str, float], delay: float) -> None:
    """Integers >= 1, finite floats > 0, a finite delay >= 0; one line naming the option."""
    for name, value in ints.items():
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    for name, number in floats.items():
        if not (math.isfinite(number) and number > 0):
            raise UsageError(f"--{name} must be a finite number > 0, got {number}")
    if not (math.isfinite(delay) and delay >= 0):
        raise UsageError(f"--max-delay-ms must be a finite number >= 0, got {delay}")


def _raise_open_file_limit(need: int) -> None:
    """Let the process hold ``need`` sockets: raise the soft open-file limit toward the hard one."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < need:
        print(
            f"warning: the open-file limit ({soft}) is below --max-connections plus the "
            f"server's own files ({need}); lower --max-connections or raise `ulimit -n`",
            file=sys.stderr,
            flush=True,
        )


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
    max_body_mb: float = 1.0,
    max_connections: int = 1024,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    idle_timeout_s: float = 30.0,
    trust_code: bool = False,
) -> None:
    """Serve ``targets`` until SIGTERM/SIGINT, then drain and return.

    ``trust_code`` allows a run's ``model.target`` import path and a ``.pt2`` that unpickles
    on loading (see :mod:`kiln.trust`); without it such a target is refused before listening.

    Raises:
        PortError: a port outside 0..65535 or a host that is not an address.
        UsageError: a non-positive or non-finite count, size or timeout.
        FileNotFoundError: a target or its data description is missing.
        ValueError: an unsupported target or task.
        RuntimeError: a worker process failed to start or died.
    """
    check_port(port)
    check_host(host)
    counts = {"workers": workers, "max-batch": max_batch, "queue-size": queue_size}
    counts["max-connections"] = max_connections
    if threads is not None:
        counts["threads"] = threads
    _check_options(
        counts,
        {
            "timeout-s": timeout_s,
            "max-body-mb": max_body_mb,
            "header-timeout-s": header_timeout_s,
            "body-timeout-s": body_timeout_s,
            "idle-timeout-s": idle_timeout_s,
        },
        max_delay_ms,
    )
    if batcher not in ("loop", "thread"):
        raise UsageError(f"--batcher must be loop or thread, got {batcher[:40]!r}")
    max_body = int(max_body_mb * (1 << 20))
    if not 1 <= max_body <= 1 << 31:
        raise UsageError(f"--max-body-mb must be between 1e-6 and 2048, got {max_body_mb}")
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
                f"--max-body-mb={max_body_mb}",
                f"--max-connections={max_connections}",
                f"--header-timeout-s={header_timeout_s}",
                f"--body-timeout-s={body_timeout_s}",
                f"--idle-timeout-s={idle_timeout_s}",
                *(["--trust-code"] if trust_code else []),
            ],
        )
        return
    import logging

    import torch

    from kiln.deploy.serve.server import Limits, ModelServer, load_backend

    limits = Limits(
        max_body=max_body,
        max_connections=max_connections,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    _raise_open_file_limit(max_connections + 64)  # 64: the model, logs, pipes, closing sockets
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    backend = load_backend(targets, tta=tta, compile=compile, trust_code=trust_code)
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
        limits=limits,
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
    from kiln.deploy.serve.http import bind_socket

    # Hold the port (bound with SO_REUSEPORT, never listening, so it gets no connections)
    # until every worker has bound it: port 0 then means one free port for all of them.
    holder = bind_socket(host, port, reuse_port=True, listen=False)
    port = holder.getsockname()[1]
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "kiln", "serve", *targets, f"--host={host}", f"--port={port}"]
    cmd.append(f"--threads={threads}")

    def spawn() -> subprocess.Popen[str]:
        return subprocess.Popen([*cmd, "--reuse-port", *extra], stdout=subprocess.PIPE, text=True)

    def ready(proc: subprocess.Popen[str]) -> str:
        """Wait for a worker's ready line; its model kind. A refusal keeps the worker's code."""
        assert proc.stdout is not None
        m = re.search(r"\((.+)\) on http", proc.stdout.readline())
        if m:
            return m.group(1)
        code = proc.wait()
        if code == EXIT_USAGE:  # the worker printed the user's error in one line already
            raise SystemExit(code)
        raise RuntimeError(f"a worker failed to start (exit {code}); see above")

    # The first worker starts alone: a target it refuses (unsafe, corrupt, missing) is then
    # reported once, by that worker, instead of once per worker.
    procs = [spawn()]
    stop = threading.Event()
    old = _signals(stop)
    try:
        kind = ready(procs[0])
        procs += [spawn() for _ in range(workers - 1)]
        for proc in procs[1:]:  # each prints one line when it is ready
            kind = ready(proc)
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

"""Start and stop a real TorchServe serving a ``.mar`` made by ``kiln export --format torchserve``.

:func:`launch_torchserve` runs ``torchserve --foreground`` on five free ports (inference,
management and metrics over HTTP, and the gRPC inference and management ports, which TorchServe
would otherwise open at 7070/7071, so two could not run side by side), writes its
``config.properties`` (token auth off, one worker per model) and
keeps everything it writes (logs, pid file, temp files) under one work folder, so several can run
side by side and nothing is left in ``/tmp``. It waits until the management API reports the model
``READY`` and returns a :class:`TorchServeProcess`, whose :meth:`~TorchServeProcess.stop` signals
the whole process group (launcher, JVM, Python workers) so no worker outlives it.

It lives apart from the archive building because it needs TorchServe itself (``pip install
torchserve`` and Java 17), which making the archive does not; the tests and the serving
benchmark use it to check the archive end to end.

Example:
    >>> ts = launch_torchserve("out/model-store/digits.mar", "tmp/ts")   # doctest: +SKIP
    >>> ts.predict_url                                                   # doctest: +SKIP
    'http://127.0.0.1:40511/predictions/digits'
    >>> ts.stop()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kiln.deploy.torchserve.archive import ARCHIVER_HINT

__all__ = ["TorchServeProcess", "config_properties", "free_ports", "launch_torchserve"]


def _free_port(host: str) -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """``GET url``: status and body (status 0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except (OSError, ValueError):
        return 0, b""


@dataclass
class TorchServeProcess:
    """A TorchServe started by :func:`launch_torchserve`, in its own process group.

    Attributes:
        proc: the ``torchserve --foreground`` launcher (the JVM and its Python workers are in
            the same process group).
        url: the inference address (``POST {url}/predictions/NAME``).
        management_url: the management address.
        model_name: the model it serves.
        workdir: the folder with ``config.properties``, ``logs/`` and its temp files.
    """

    proc: subprocess.Popen[bytes]
    url: str
    management_url: str
    model_name: str
    workdir: Path

    @property
    def predict_url(self) -> str:
        """``{url}/predictions/NAME``."""
        return f"{self.url}/predictions/{self.model_name}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of TorchServe's own log and of the model's log, for error messages."""
        parts = []
        for name in ("ts_log.log", "model_log.log", "launcher.log"):
            f = self.workdir / "logs" / name
            if f.is_file():
                parts.append(f"--- {name} ---\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the whole group (launcher, JVM, workers), SIGKILL after ``timeout``."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the launcher is gone; make sure the JVM and workers in its group are too
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return self.proc.returncode
                time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.poll()


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (the OS picks them).

    Example:
        >>> len(set(free_ports("127.0.0.1", 5)))
        5
    """
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def config_properties(host: str, ports: list[int]) -> tuple[list[str], str]:
    """TorchServe's ``config.properties`` on the given five ports, and its three HTTP URLs.

    ``ports`` are: inference, management, metrics, gRPC inference, gRPC management. Token auth
    is off and each model gets one worker.

    Example:
        >>> urls, text = config_properties("127.0.0.1", [8080, 8081, 8082, 9070, 9071])
        >>> urls[0], "grpc_inference_port=9070" in text
        ('http://127.0.0.1:8080', True)
    """
    if len(ports) != 5 or len(set(ports)) != 5:
        raise ValueError(f"config_properties needs 5 distinct ports, got {ports}")
    urls = [f"http://{host}:{p}" for p in ports[:3]]
    text = (
        f"inference_address={urls[0]}\n"
        f"management_address={urls[1]}\n"
        f"metrics_address={urls[2]}\n"
        f"grpc_inference_port={ports[3]}\n"
        f"grpc_management_port={ports[4]}\n"
        "disable_token_authorization=true\n"
        "default_workers_per_model=1\n"
    )
    return urls, text


def launch_torchserve(
    archive: str | Path,
    workdir: str | Path,
    *,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> TorchServeProcess:
    """Start TorchServe in the foreground on free ports and wait until the model is ready.

    Everything it writes (``config.properties``, ``logs/``, its pid file and temp files) goes
    under ``workdir``, so several can run side by side and nothing is left in ``/tmp``. Token
    auth is off and config snapshots too (``--ncs``); call :meth:`TorchServeProcess.stop`.

    Args:
        archive: the ``.mar`` file (its folder is the model store).
        workdir: a folder for TorchServe's files (created).
        host: the interface for all three addresses.
        ready_timeout_s: how long to wait for a ready worker.
        env: the environment (default: this process's).

    Returns:
        A running :class:`TorchServeProcess`.

    Raises:
        FileNotFoundError: no ``torchserve`` or ``java`` on PATH, or no archive.
        RuntimeError: TorchServe exited or was not ready in time (its log tail included).

    Example:
        >>> ts = launch_torchserve("out/model-store/digits.mar", "tmp/ts")   # doctest: +SKIP
        >>> ts.predict_url                                                   # doctest: +SKIP
        'http://127.0.0.1:40511/predictions/digits'
        >>> ts.stop()                                                        # doctest: +SKIP
    """
    mar = Path(archive).resolve()
    if not mar.is_file():
        raise FileNotFoundError(f"no TorchServe archive at {mar}; make one with kiln export")
    exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
    if not Path(exe).is_file():
        raise FileNotFoundError(f"torchserve is not installed: {ARCHIVER_HINT}")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise FileNotFoundError("TorchServe needs Java 17 (java on PATH or JAVA_HOME)")
    work = Path(workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    urls, text = config_properties(host, free_ports(host, 5))
    config = work / "config.properties"
    config.write_text(text)
    name = mar.stem
    child_env = dict(os.environ if env is None else env)
    # TorchServe keeps its pid file in the temp dir and logs under LOG_LOCATION.
    child_env.update(
        TMPDIR=str(work / "tmp"),
        TEMP=str(work / "tmp"),
        LOG_LOCATION=str(work / "logs"),
        METRICS_LOCATION=str(work / "logs"),
    )
    cmd = [
        exe,
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config",
        str(config),
        "--model-store",
        str(mar.parent),
        "--models",
        f"{name}={mar.name}",
    ]
    with (work / "logs" / "launcher.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ts = TorchServeProcess(proc, urls[0], urls[1], name, work)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        status, body = _get(f"{urls[1]}/models/{name}")
        if status == 200 and b'"READY"' in body:
            return ts
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.poll() is not None else f"not ready in {ready_timeout_s:g} s"
            ts.stop()
            raise RuntimeError(f"TorchServe {why}\n{ts.log_tail()}")
        time.sleep(0.25)

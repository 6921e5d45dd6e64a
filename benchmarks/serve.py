"""Claim: ``kiln serve`` answers >= 2x TorchServe's requests/s at 32 clients, with a lower p99.

One small model, the digits MLP (64-256-256-10, ``configs/digits_mlp.yaml``, trained one
epoch), exported once with ``kiln export --format torchserve``. Every server serves the same
``model.pt2`` file from that export, on 127.0.0.1, with one torch thread:

* ``kiln serve``: ``kiln serve model.pt2`` (greedy batching: takes what is queued, up to 32);
* ``TorchServe``: the ``.mar`` archive with its generated handler, one worker, batch size 32,
  ``maxBatchDelay`` 5 ms (``--ts-delay-ms``), token auth off, ``--ncs``;
* ``LitServe`` (when importable): a ``LitAPI`` over the same file, batch 32, timeout 5 ms.

Each server is started, measured at every concurrency and stopped in turn, and the servers are
interleaved over repetitions (rep 1: kiln, TorchServe, LitServe; rep 2: TorchServe, ...); the
table gives the median over repetitions. The load generator runs in its own process: one thread
per client, each with an HTTP/1.1 keep-alive connection (``http.client``), closed loop, one
example per request; a warm-up of ``--warmup`` requests, then ``--requests`` timed ones.
Latency is client-side (send to full answer read). Client and servers share the machine's cores,
so the load generator's own CPU use is part of every number alike.

Run:  .venv/bin/python benchmarks/serve.py            (about 6 minutes)
      .venv/bin/python benchmarks/serve.py --quick    (smoke test, < 60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CONCURRENCY = (1, 8, 32, 64)
TARGET_RATIO, TARGET_AT = 2.0, 32
SERVERS = ("kiln serve", "TorchServe", "LitServe")

_LITSERVE_APP = """
import sys, torch, litserve as ls

torch.set_num_threads(1)


class API(ls.LitAPI):
    def setup(self, device):
        self.model = torch.export.load(sys.argv[1]).module()

    def decode_request(self, request):
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=-1)

    def unbatch(self, out):
        return list(out)

    def encode_response(self, p):
        i = int(p.argmax())
        return {"outputs": [{"label": i, "class_index": i, "probabilities": p.tolist()}]}


if __name__ == "__main__":
    api = API(max_batch_size=32, batch_timeout=0.005)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )
"""


# ----------------------------------------------------------------------------- load generator


def load(url: str, concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    """Closed-loop load on ``url`` (runs in the load-generator process).

    ``concurrency`` clients, each one keep-alive connection sending its next request when the
    last answer is in, all on one asyncio loop with pre-encoded requests: a client costs a few
    tens of microseconds per request, so on a small machine the servers, not the load
    generator, get the CPU (an ``http.client`` thread per client took ~1 core at ~4000 req/s).
    """
    import asyncio
    import random

    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()  # type: ignore[union-attr]
    rng = random.Random(0)
    payloads = []
    for _ in range(64):
        body = json.dumps({"inputs": [rng.random() for _ in range(64)]}).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        payloads.append(head.encode() + body)

    async def answer(reader: asyncio.StreamReader) -> int:
        """Read one response; returns its status."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if "content-length" in fields:
            await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    async def client(n: int, lat: list[float], errors: list[int], offset: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for k in range(n):
            t0 = time.perf_counter()
            try:
                writer.write(payloads[(offset + k) % len(payloads)])
                ok = await answer(reader) == 200
            except (OSError, ValueError, asyncio.IncompleteReadError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
            lat.append(time.perf_counter() - t0)
            if not ok:
                errors.append(1)
        writer.close()

    async def phase(total: int) -> tuple[float, list[float], int]:
        per = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
        lats: list[list[float]] = [[] for _ in per]
        errs: list[int] = []
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client(n, lat, errs, i) for i, (n, lat) in enumerate(zip(per, lats, strict=True)))
        )
        wall = time.perf_counter() - t0
        return wall, sorted(x for lat in lats for x in lat), len(errs)

    async def main() -> tuple[float, list[float], int]:
        await phase(max(warmup, concurrency))
        return await phase(requests)

    wall, lat, errors = asyncio.run(main())
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3  # noqa: E731
    return {"rps": len(lat) / wall, "p50": pick(0.50), "p99": pick(0.99), "errors": errors}


# ----------------------------------------------------------------------------- servers


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} in {timeout:g} s")


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Started:
    """A started server: its predict URL and how to stop it."""

    def __init__(self, url: str, stop: Any) -> None:
        self.url, self.stop = url, stop


def start_kiln(model: Path, env: dict[str, str], workers: int = 1) -> Started:
    cmd = [sys.executable, "-m", "kiln", "serve", str(model), "--port", "0", "--max-batch", "32"]
    if workers > 1:
        cmd += ["--workers", str(workers), "--threads", "1"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout

    def pump() -> None:  # keeps reading, so the server never blocks on a full pipe
        for x in out:
            lines.put(x)

    threading.Thread(target=pump, daemon=True).start()
    line = lines.get(timeout=120)
    m = re.search(r"(http://127\.0\.0\.1:\d+) \(ready\)", line)
    if not m:
        _stop_group(proc)
        raise RuntimeError(f"kiln serve did not start: {line}")
    return Started(m.group(1) + "/predict", lambda: _stop_group(proc))


def start_torchserve(archive: Path, work: Path, env: dict[str, str]) -> Started:
    from kiln.deploy.torchserve.process import launch_torchserve

    ts = launch_torchserve(archive, work, env=env)
    return Started(ts.predict_url, ts.stop)


def start_litserve(model: Path, work: Path, env: dict[str, str]) -> Started:
    app = work / "litserve_app.py"
    app.write_text(textwrap.dedent(_LITSERVE_APP))
    with socket.socket() as sock:  # a port the OS says is free
        sock.bind(("127.0.0.1", 0))
        p = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(app), str(model), str(p)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=work,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{p}/health", proc)
    except RuntimeError:
        _stop_group(proc)
        raise
    return Started(f"http://127.0.0.1:{p}/predict", lambda: _stop_group(proc))


# ----------------------------------------------------------------------------- main


def prepare(work: Path, ts_delay_ms: int, quick: bool, ts_workers: int = 1) -> tuple[Path, Path]:
    """Train the digits MLP briefly and export it for TorchServe; returns (model.pt2, .mar)."""
    from kiln.config import load_config
    from kiln.deploy.torchserve.archive import export_torchserve
    from kiln.train.trainer import Trainer

    overrides = [f"out_dir={work}", "name=bench", "train.epochs=1"]
    overrides += ["log.tensorboard=false", "log.progress=false"]
    if quick:
        overrides.append("model.kwargs.hidden=[32]")
    cfg = load_config(C.ROOT / "configs/digits_mlp.yaml", overrides)
    run_dir = Trainer(cfg, verbose=False).fit().run_dir
    ts = export_torchserve(
        [run_dir], out=work / "export", max_batch_delay_ms=ts_delay_ms, workers=ts_workers
    )
    return ts.export.path, ts.archive


def measure(server: Started, levels: tuple[int, ...], requests: int, warmup: int) -> dict[int, Any]:
    """Run the load generator process at each concurrency against ``server``."""
    results = {}
    for c in levels:
        n = max(requests, 20 * c)
        cmd = [sys.executable, __file__, "--load", server.url, "--concurrency", str(c)]
        cmd += ["--requests", str(n), "--warmup", str(warmup)]
        results[c] = C.run_child(cmd, env=C.single_thread_env(), timeout=600)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: few requests, < 60 s")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per server (default 3)")
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per level")
    ap.add_argument("--warmup", type=int, default=300, help="untimed requests per level")
    ap.add_argument("--ts-delay-ms", type=int, default=5, help="TorchServe maxBatchDelay")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    ap.add_argument("--kiln-workers", type=int, default=1, help="kiln serve --workers N")
    ap.add_argument("--ts-workers", type=int, default=1, help="TorchServe worker processes")
    ap.add_argument(
        "--levels", default=",".join(map(str, CONCURRENCY)), help="client counts, e.g. 1,32"
    )
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        C.emit(load(args.load, args.concurrency, args.requests, args.warmup))
        return
    levels = (1, 8) if args.quick else tuple(int(c) for c in args.levels.split(","))
    reps = 1 if args.quick else args.reps
    requests, warmup = (100, 20) if args.quick else (args.requests, args.warmup)

    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    skipped: dict[str, str] = {}
    has_ts = shutil.which("torchserve") or (Path(sys.executable).parent / "torchserve").is_file()
    has_java = shutil.which("java") or os.environ.get("JAVA_HOME")
    if "TorchServe" in wanted and not (has_ts and has_java):
        skipped["TorchServe"] = "needs Java 17 and torchserve (pip install torchserve)"
    if "LitServe" in wanted and C.python_for("litserve", []) is None:
        skipped["LitServe"] = "litserve is not installed"
    servers = [s for s in wanted if s in SERVERS and s not in skipped]

    env = C.single_thread_env()
    env["PYTHONPATH"] = os.pathsep.join([str(C.ROOT / "src"), env.get("PYTHONPATH", "")])
    raw: dict[str, list[dict[int, Any]]] = {s: [] for s in servers}
    with tempfile.TemporaryDirectory(prefix="kiln-serve-bench-") as tmp:
        work = Path(tmp)
        model, archive = prepare(work, args.ts_delay_ms, args.quick, args.ts_workers)
        for rep in range(reps):
            for name in C.interleaved(servers, rep):
                print(f"rep {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
                if name == "kiln serve":
                    started = start_kiln(model, env, args.kiln_workers)
                elif name == "TorchServe":
                    started = start_torchserve(archive, work / f"ts-{rep}", env)
                else:
                    started = start_litserve(model, work, env)
                try:
                    raw[name].append(measure(started, levels, requests, warmup))
                finally:
                    started.stop()

    def med(name: str, c: int, key: str) -> float:
        return C.median([r[c][key] for r in raw[name]])

    print(f"# serving: {'quick smoke test' if args.quick else 'median of ' + str(reps) + ' reps'}")
    print(C.machine_facts(threads=1, pinning="none (servers and load generator share the cores)"))
    print(
        f"\nTorchServe: batch 32, maxBatchDelay {args.ts_delay_ms} ms, "
        f"{args.ts_workers} worker(s); kiln serve: {args.kiln_workers} process(es), max batch 32, "
        "no wait; one example per request; keep-alive clients\n"
    )
    rows = []
    for c in levels:
        for name in servers:
            row = [
                c,
                name,
                f"{med(name, c, 'rps'):.0f}",
                C.spread([r[c]["rps"] for r in raw[name]]),
            ]
            row += [f"{med(name, c, 'p50'):.2f}", f"{med(name, c, 'p99'):.2f}"]
            row += [sum(r[c]["errors"] for r in raw[name])]
            if "kiln serve" in servers and name != "kiln serve":
                ratio = C.median(
                    [
                        k[c]["rps"] / o[c]["rps"]
                        for k, o in zip(raw["kiln serve"], raw[name], strict=True)
                    ]
                )
                row.append(f"{ratio:.2f}")
            else:
                row.append("-")
            rows.append(row)
    heads = [
        "clients",
        "server",
        "req/s",
        "req/s min-max",
        "p50 ms",
        "p99 ms",
        "errors",
        "ratio kiln/this (req/s)",
    ]
    print(C.table(heads, rows))
    for name, why in skipped.items():
        print(f"\n{name} skipped: {why}")
    if "kiln serve" in servers and "TorchServe" in servers and TARGET_AT in levels:
        ratio = C.median(
            [
                k[TARGET_AT]["rps"] / t[TARGET_AT]["rps"]
                for k, t in zip(raw["kiln serve"], raw["TorchServe"], strict=True)
            ]
        )
        p99k, p99t = med("kiln serve", TARGET_AT, "p99"), med("TorchServe", TARGET_AT, "p99")
        met = ratio >= TARGET_RATIO and p99k < p99t
        print(
            f"\nclaim at {TARGET_AT} clients: req/s ratio kiln/TorchServe {ratio:.2f} "
            f"(target >= {TARGET_RATIO:g}), p99 {p99k:.1f} vs {p99t:.1f} ms: "
            f"{'met' if met else 'NOT met'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()

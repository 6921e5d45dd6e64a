"""A ``kiln serve`` subprocess for tests: start, wait for its ready line, query, stop."""

from __future__ import annotations

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from runners import kiln_env


class Server:
    """A ``kiln serve`` subprocess and its port."""

    def __init__(self, target: Path | list[Path], log: Path, *args: str) -> None:
        self.log = log.open("w")
        targets = [str(t) for t in (target if isinstance(target, list) else [target])]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "serve", *targets, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=kiln_env(),
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        out = self.proc.stdout

        def pump() -> None:
            for x in out:
                lines.put(x)

        threading.Thread(target=pump, daemon=True).start()
        line = lines.get(timeout=60)
        m = re.search(r"http://127\.0\.0\.1:(\d+) \(ready\)", line)
        assert m, line
        self.port = int(m.group(1))

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()

    def predict(self, inputs: Any) -> tuple[int, Any]:
        status, data, _ = self.request("POST", "/predict", json.dumps({"inputs": inputs}).encode())
        return status, json.loads(data)

    def close(self, *, signal_it: bool = True) -> int:
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.log.close()
        return code

"""Mutation checks: remove one mechanism at a time in a scratch copy and check its test fails.

Each ``mutations/*.toml`` file lists mutations of one area::

    [[mutation]]
    mechanism = "SWA state restored on resume"
    file = "src/kiln/algorithms/swa.py"
    find = "self.n_averaged.copy_(state['n'])"      # must occur exactly once in the file
    replace = "pass"
    test = "tests/train/test_resume.py::test_swa_resume_exact"

For every entry the tree (``src``, ``tests``, ``configs``, ``data``, ``examples``, ``benchmarks``,
``pyproject.toml``) is copied to a temporary folder, the patch applied, and the test run there with
that copy's ``src`` first on ``PYTHONPATH`` (so subprocesses that run ``kiln`` see the mutant too).
A mutation is *killed* when the test fails, *survived* when it passes; a ``find`` text that is not
in the file exactly once is reported as *stale* (the code moved: update the entry). The table goes
to stdout; the exit code is 1 when anything survived or is stale.

Usage::

    make mutation                       # all entries
    python mutations/run.py -k resume   # entries whose mechanism or test mentions "resume"
    python mutations/run.py --list
    python mutations/run.py --check     # every 'find' still applies (no tests run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
COPIED = [
    "src",
    "tests",
    "configs",
    "data",
    "examples",
    "benchmarks",
    "pyproject.toml",
    ".importlinter",
]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".pytest_cache", "*.egg-info")


@dataclass(frozen=True)
class Mutation:
    mechanism: str
    file: str
    find: str
    replace: str
    test: str
    source: str


def load(folder: Path = ROOT / "mutations") -> list[Mutation]:
    """Every entry of every ``*.toml`` in ``folder``, in file then entry order."""
    out = []
    for path in sorted(folder.glob("*.toml")):
        with open(path, "rb") as f:
            for entry in tomllib.load(f).get("mutation", []):
                out.append(Mutation(**entry, source=path.name))
    return out


def run_one(m: Mutation, timeout: float) -> tuple[str, float, str]:
    """Apply ``m`` in a scratch copy and run its test; (verdict, seconds, last output line)."""
    with tempfile.TemporaryDirectory(prefix="kiln-mutant-") as tmp:
        scratch = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, scratch / name, ignore=IGNORED)
            elif src.exists():
                shutil.copy2(src, scratch / name)
        target = scratch / m.file
        text = target.read_text()
        if text.count(m.find) != 1:
            return "stale", 0.0, f"'find' occurs {text.count(m.find)} times in {m.file}"
        target.write_text(text.replace(m.find, m.replace))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(scratch / "src"), str(scratch / "tests" / "helpers"), env.get("PYTHONPATH", "")]
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", m.test]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, f"over {timeout:.0f} s"
        took = time.perf_counter() - start
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        if proc.returncode == 5 or "no tests ran" in last:
            return "stale", took, f"test not found: {m.test}"
        return ("killed" if proc.returncode != 0 else "survived"), took, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only entries whose mechanism/test/file contains this")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    ap.add_argument(
        "--check", action="store_true", help="only check that every 'find' occurs exactly once"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    args = ap.parse_args(argv)
    muts = [
        m for m in load() if args.k.lower() in f"{m.mechanism} {m.test} {m.file} {m.source}".lower()
    ]
    if args.list:
        for m in muts:
            print(f"{m.source:16} {m.mechanism}  ->  {m.test}")
        return 0
    if args.check:
        stale = [m for m in muts if (ROOT / m.file).read_text().count(m.find) != 1]
        for m in stale:
            print(f"stale: {m.source}: {m.mechanism} ({m.file})")
        print(f"{len(muts) - len(stale)}/{len(muts)} entries apply")
        return 1 if stale else 0
    rows = []
    for i, m in enumerate(muts, 1):
        print(f"[{i}/{len(muts)}] {m.mechanism} ...", end=" ", flush=True)
        verdict, took, last = run_one(m, args.timeout)
        print(f"{verdict} ({took:.0f} s)", flush=True)
        rows.append((m, verdict, took, last))
    print("\n| mechanism removed | test | result | s |\n|---|---|---|---|")
    for m, verdict, took, _ in rows:
        print(f"| {m.mechanism} | `{m.test}` | {verdict} | {took:.0f} |")
    bad = [(m, v, last) for m, v, _, last in rows if v != "killed"]
    for m, v, last in bad:
        print(f"\n{v.upper()}: {m.mechanism} ({m.source})\n  {last}")
    print(f"\n{len(rows) - len(bad)}/{len(rows)} killed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

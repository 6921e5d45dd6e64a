"""Claims: ``kiln --help`` < 0.3 s, and ``import kiln; kiln.Trainer`` < ``import torch`` + 0.1 s.

Each command runs in a fresh process (wall time of the whole process, interpreter start
included), pinned to one core; commands are interleaved and the median of ``--reps`` (default 7)
is reported. Then ``python -X importtime`` shows what ``import kiln.train.trainer`` imports
beyond ``import torch``: the 10 biggest modules by cumulative time, and the same time grouped by
top-level package.

Run:  .venv/bin/python benchmarks/import_time.py            (about 1 minute)
      .venv/bin/python benchmarks/import_time.py --quick    (smoke test, < 30 s)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

HELP_TARGET_S = 0.3
TRAINER_MARGIN_S = 0.1


def commands(py: str, kiln_exe: str) -> dict[str, list[str]]:
    return {
        "python -c pass": [py, "-c", "pass"],
        "kiln --help": [kiln_exe, "--help"],
        'python -c "import kiln"': [py, "-c", "import kiln"],
        'python -c "import torch"': [py, "-c", "import torch"],
        'python -c "import kiln, torch"': [py, "-c", "import kiln, torch"],
        'python -c "import kiln; kiln.Engine"': [py, "-c", "import kiln; kiln.Engine"],
        'python -c "import kiln; kiln.Trainer"': [py, "-c", "import kiln; kiln.Trainer"],
    }


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, cwd=str(C.ROOT))
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()[-2000:]}")
    return took


def parse_importtime(stderr: str) -> list[tuple[int, str, int, int]]:
    """Rows ``(depth, module, self_us, cumulative_us)`` in the order Python printed them."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3:
            continue
        raw_name = fields[2]
        depth = (len(raw_name) - len(raw_name.lstrip(" ")) - 1) // 2
        rows.append((depth, raw_name.strip(), int(fields[0]), int(fields[1])))
    return rows


def beyond_torch(py: str, env: dict[str, str], pin: list[str]) -> list[tuple[str, int, int, str]]:
    """Modules ``import kiln.train.trainer`` adds after ``import torch``.

    Returns ``(module, self_us, cumulative_us, top-level import that pulled it in)``.
    """
    proc = subprocess.run(
        [*pin, py, "-X", "importtime", "-c", "import torch; import kiln.train.trainer"],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(C.ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rows = parse_importtime(proc.stderr)
    end_of_torch = next(i for i, r in enumerate(rows) if r[0] == 0 and r[1] == "torch")
    after = rows[end_of_torch + 1 :]
    # Children are printed before their parent; walk backwards to know each row's ancestors.
    out = []
    stack: list[tuple[int, str]] = []
    for depth, name, self_us, cum_us in reversed(after):
        while stack and stack[-1][0] >= depth:
            stack.pop()
        chain = [n for _, n in stack]
        out.append((name, self_us, cum_us, " < ".join(reversed(chain[-2:])) if chain else ""))
        stack.append((depth, name))
    out.reverse()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repetition, < 30 s")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--importtime-runs", type=int, default=3, help="-X importtime runs (median)")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    args = ap.parse_args()
    reps, it_runs = (1, 1) if args.quick else (args.reps, args.importtime_runs)

    py = sys.executable
    kiln_exe = str(Path(py).parent / "kiln")
    if not Path(kiln_exe).exists():
        raise SystemExit(f"no kiln console script next to {py}; install kiln: pip install -e .")
    pin = C.pin_prefix(args.cpu)
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    cmds = commands(py, kiln_exe)

    print("# Import time: fresh process per command, wall time including interpreter start")
    print(C.machine_facts(None, C.describe_pin(pin)))
    print(f"{reps} interleaved repetition(s) per command; interpreter {py}")
    sys.stdout.flush()

    # One throw-away round warms the OS file cache, as a user's second run would be.
    for cmd in cmds.values():
        wall([*pin, *cmd], env)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    names = list(cmds)
    for rep in range(reps):
        for name in C.interleaved(names, rep):
            times[name].append(wall([*pin, *cmds[name]], env))

    torch_name = 'python -c "import torch"'
    rows = []
    for name in names:
        ts = times[name]
        over = [a - b for a, b in zip(ts, times[torch_name], strict=True)]
        rows.append([f"`{name}`", f"{C.median(ts):.3f}", C.spread(ts), f"{C.median(over):+.3f}"])
    print()
    print(C.table(["command", "median s", "min-max s", "vs import torch (s, paired median)"], rows))

    help_s = C.median(times["kiln --help"])
    trainer_name = 'python -c "import kiln; kiln.Trainer"'
    extra = C.median([a - b for a, b in zip(times[trainer_name], times[torch_name], strict=True)])
    print()
    print(
        f"target `kiln --help` < {HELP_TARGET_S} s: {help_s:.3f} s -> "
        f"{'PASS' if help_s < HELP_TARGET_S else 'FAIL'}"
    )
    print(
        f"target `import kiln; kiln.Trainer` < `import torch` + {TRAINER_MARGIN_S} s: "
        f"+{extra:.3f} s -> {'PASS' if extra < TRAINER_MARGIN_S else 'FAIL'}"
    )

    # ------------------------------------------------------------ what is imported beyond torch
    per_run = [beyond_torch(py, env, pin) for _ in range(it_runs)]
    cum: dict[str, list[int]] = defaultdict(list)
    selfs: dict[str, list[int]] = defaultdict(list)
    parent: dict[str, str] = {}
    for run in per_run:
        for name, self_us, cum_us, par in run:
            cum[name].append(cum_us)
            selfs[name].append(self_us)
            parent.setdefault(name, par)
    total = C.median([sum(s for _, s, _, _ in run) for run in per_run]) / 1e6
    print(
        f"\n## `python -X importtime -c 'import torch; import kiln.train.trainer'`: "
        f"{total:.2f} s of imports after torch (median of {it_runs} run(s); -X importtime "
        "itself adds overhead, so read the shares, not the absolute values)"
    )
    non_torch = [n for n in cum if n != "torch" and not n.startswith("torch.")]
    biggest = sorted(non_torch, key=lambda n: -C.median(cum[n]))[:10]
    print("\n10 biggest non-torch modules by cumulative import time (nested ones overlap):")
    print(
        C.table(
            ["module", "cumulative s", "self s", "imported from"],
            [
                [
                    n,
                    f"{C.median(cum[n]) / 1e6:.3f}",
                    f"{C.median(selfs[n]) / 1e6:.3f}",
                    parent[n] or "(top level)",
                ]
                for n in biggest
            ],
        )
    )
    by_pkg: dict[str, float] = defaultdict(float)
    for n in cum:
        by_pkg[n.split(".")[0]] += C.median(selfs[n]) / 1e6
    top = sorted(by_pkg.items(), key=lambda kv: -kv[1])[:10]
    print("\nSelf time grouped by top-level package (sums to the total above):")
    print(
        C.table(
            ["package", "self s", "share"],
            [[p, f"{s:.3f}", f"{s / max(total, 1e-9):.0%}"] for p, s in top],
        )
    )
    if args.quick:
        print("(--quick: 1 repetition; a smoke test, not a measurement)")


if __name__ == "__main__":
    main()

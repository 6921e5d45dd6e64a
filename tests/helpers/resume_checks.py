"""Checks that a run was *resumed* (not restarted): where the resumed process started, and that
it did only the remaining updates. Final weights alone cannot tell the two apart, because a
restart from step 0 with the same seed ends with the same weights.

Runs checked here log every update (``train.log_every=1``), so the ``train/loss`` records after a
resume record are exactly the updates that process did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``run_dir/metrics.jsonl``, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_resumed_once_at(run_dir: Path, step: int, total: int) -> dict[str, Any]:
    """One resume, at ``step``; after it exactly the updates ``step+1 .. total``; summary agrees.

    Returns the resume record (for checks of its epoch, batch, world size).
    """
    recs = records(run_dir)
    marks = [i for i, r in enumerate(recs) if r.get("event") == "resumed"]
    assert len(marks) == 1, f"expected one resume record, found {len(marks)}"
    mark = recs[marks[0]]
    assert mark["step"] == step, (mark, step)
    updates = [r["step"] for r in recs[marks[0] + 1 :] if "train/loss" in r]
    assert updates == list(range(step + 1, total + 1)), (updates[:5], updates[-5:], step, total)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == [step], summary.get("resumed_from_step")
    assert summary["steps"] == total
    return mark


def tree_digest(folder: Path) -> str:
    """A hash of everything under ``folder``: names, sizes, modification times and bytes."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}|".encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()

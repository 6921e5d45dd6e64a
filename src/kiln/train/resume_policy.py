"""Which config changes a resume may make, and where they are recorded.

A run directory's ``config.yaml`` is the provenance of the run: the settings its weights were
trained with. Resuming (``resume=RUN``) with a different config used to rewrite it, so a run
resumed with ``data.batch_size=7`` claimed a batch size it never trained with. Now:

* changes that only *extend* or *observe* the run are allowed (:data:`ALLOWED`): the length
  (``train.epochs``, ``train.max_steps``), logging and checkpoint cadence, where and how it runs
  (device, strategy, compile, loader workers), and the non-finite policy for the rest of the run;
* every other change (data, model, loss, optimizer, scheduler, batch size, accumulation,
  precision, seed, techniques...) would make a different run: it is refused with the list of
  differences (``key: old -> new``) before anything is loaded or written;
* ``config.yaml`` is never rewritten on resume; each resume appends one JSON line to
  ``resumes.jsonl`` (time, checkpoint, step, allowed changes), so the run's history is complete.

Changes are compared against the run's ``config.yaml`` with the changes of earlier resumes
(``resumes.jsonl``) applied. A checkpoint file outside a run directory starts a new run, which
writes its own ``config.yaml``; nothing is compared then.

Example:
    >>> diff({"train": {"epochs": 2}}, {"train": {"epochs": 4}})
    {'train.epochs': (2, 4)}
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from kiln.config import Config, ConfigError, read_yaml
from kiln.errors import short_repr
from kiln.run import CONFIG, run_dir_of_checkpoint

__all__ = ["ALLOWED", "IGNORED", "ResumePlan", "check", "diff", "record"]

#: Keys a resume may change (globs over dotted keys); each change is recorded in resumes.jsonl.
ALLOWED = (
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.val_every",
    "train.top_k",
    "train.auto_microbatch",
    "train.nonfinite",
    "train.rollback_lr_factor",
    "train.max_rollbacks",
    "train.max_consecutive_skips",
    "checkpoint.every_n_steps",
    "checkpoint.every_epoch",
    "checkpoint.keep_last",
    "checkpoint.keep_best",
    "log.*",
    "device",
    "strategy",
    "compile",
    "deterministic",
    "detect_anomaly",
    "data.num_workers",
    "data.persistent_workers",
    "data.pin_memory",
    "data.eval_batch_size",
)
#: Keys that say where a run is, not what it is: never compared or recorded.
IGNORED = ("resume", "name", "out_dir")
#: Name of the resume history file in a run directory.
HISTORY = "resumes.jsonl"
_SHOWN = 12


@dataclass(frozen=True)
class ResumePlan:
    """A resume into an existing run directory that passed :func:`check`."""

    run_dir: Path
    checkpoint: Path
    changes: dict[str, tuple[Any, Any]]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


_UNSET = "<unset>"


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested config dicts: ``key: (old, new)``."""
    a, b = _flatten(old), _flatten(new)
    return {
        k: (a.get(k, _UNSET), b.get(k, _UNSET))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    }


def _allowed(key: str) -> bool:
    return any(key == p or fnmatch(key, p) for p in ALLOWED)


def resume_source(resume: str | Path) -> tuple[Path, Path | None]:
    """The checkpoint file ``resume`` names and its run directory (None for a loose file)."""
    from kiln.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(resume)
    return ckpt, run_dir_of_checkpoint(ckpt)


def previous_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's effective config: ``config.yaml`` plus the changes of earlier resumes."""
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    raw = read_yaml(path)
    with contextlib.suppress(ValueError):  # fill in keys added since, with their defaults
        raw = Config.model_validate(raw).model_dump(mode="json")
    flat = _flatten(raw)
    history = run_dir / HISTORY
    if history.is_file():
        for line in history.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            for key, (_, new) in entry.get("changes", {}).items():
                flat[key] = new
    return _unflatten(flat)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def check(cfg: Config) -> ResumePlan | None:
    """Refuse a resume whose config changes the run; None when there is no run to compare with.

    Raises:
        ConfigError: with every refused change as ``key: old -> new`` and what to do instead.
    """
    if not cfg.resume:
        return None
    ckpt, run_dir = resume_source(cfg.resume)
    old = previous_config(run_dir) if run_dir is not None else None
    if run_dir is None or old is None:
        return None
    new = cfg.model_dump(mode="json")
    changes = {k: v for k, v in diff(old, new).items() if not any(fnmatch(k, p) for p in IGNORED)}
    refused = [k for k in changes if not _allowed(k)]
    if refused:
        shown = ", ".join(
            f"{k}: {short_repr(changes[k][0], 40)} -> {short_repr(changes[k][1], 40)}"
            for k in refused[:_SHOWN]
        )
        more = f" and {len(refused) - _SHOWN} more" if len(refused) > _SHOWN else ""
        raise ConfigError(
            f"resume={cfg.resume} would change what run {run_dir} trains: {shown}{more}. "
            f"Resume with the run's own settings (kiln train resume={cfg.resume} reads them from "
            "its config.yaml), or start a new run. A resume may change only the length "
            "(train.epochs, train.max_steps), logging and checkpoint cadence and where it runs "
            "(device, strategy, loader workers): kiln.train.resume_policy.ALLOWED"
        )
    return ResumePlan(run_dir=run_dir, checkpoint=ckpt, changes=changes)


def record(run_dir: Path, plan: ResumePlan | None, step: int) -> bool:
    """Append this resume to ``resumes.jsonl``; False when ``run_dir`` is not the plan's run.

    The caller writes a fresh ``config.yaml`` only when this returns False.
    """
    if plan is None or plan.run_dir.resolve() != Path(run_dir).resolve():
        return False
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(plan.checkpoint.relative_to(plan.run_dir)),
        "step": step,
        "changes": {k: list(v) for k, v in plan.changes.items()},
    }
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return True

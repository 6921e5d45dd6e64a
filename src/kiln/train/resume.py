"""What a resumed run records about where it started, and whether it has anything left to do.

* :func:`resume_record`: the ``{"event": "resumed", ...}`` line a resumed process writes to
  ``metrics.jsonl`` first, so a reader (and a test) sees the step, epoch and batch it continued
  from, and can count the updates done after it.
* :func:`completed_message`: a run whose checkpoint is its final one (``summary.json`` was written
  from it) and that has no epochs or steps left, or that stopped early, is complete; resuming it
  says so and changes nothing instead of training again or appending a duplicate test line.
* :func:`locate_run`: the run directory and the checkpoint a process continues from (an explicit
  ``resume=``, or the last checkpoint of a worker group that torchrun restarted).
* :func:`completed_result`: the :class:`~kiln.train.finish.FitResult` of such a run, read back
  from its ``summary.json``.
* :func:`open_run`: all of the above for a new Trainer: the run directory, the loop state it
  starts from (restored into the parts), and its files written when there is work to do.

Example:
    >>> rec = resume_record({"epoch": 1, "batch": 3, "step": 16}, Path("step-16.ckpt"), 2, False)
    >>> rec["event"], rec["epoch"], rec["batch"], rec["checkpoint"]
    ('resumed', 1, 3, 'step-16.ckpt')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import Config
from kiln.run import CHECKPOINTS, read_summary, run_dir_of_checkpoint, write_run_files
from kiln.train import build, distributed, resume_policy, snapshots
from kiln.train.build import Parts
from kiln.train.checkpoint import resolve_checkpoint
from kiln.train.finish import FitResult
from kiln.train.loop_state import LoopState

__all__ = [
    "completed_message",
    "completed_result",
    "locate_run",
    "open_run",
    "resume_record",
]


def locate_run(
    cfg: Config, run_dir: str | Path | None, *, is_zero: bool
) -> tuple[Path, Path | None, bool]:
    """Where this process writes and what it resumes: ``(run_dir, checkpoint or None, elastic)``.

    A checkpoint inside ``RUN/checkpoints`` continues in ``RUN``; a fresh run gets a new folder
    (rank 0 chooses, every rank learns it). A worker group restarted by torchrun (``elastic``)
    continues from its run's last checkpoint.
    """
    resume = resolve_checkpoint(cfg.resume) if cfg.resume else None
    chosen: Path | None = None
    if run_dir is not None:
        chosen = Path(run_dir)
    elif resume is not None and run_dir_of_checkpoint(resume) is not None:
        chosen = run_dir_of_checkpoint(resume)
    elif is_zero:
        earlier = distributed.elastic_run_dir(Path(cfg.out_dir), cfg.name)
        chosen = earlier or build.new_run_dir(cfg.out_dir, cfg.name)
    chosen = distributed.broadcast_object(chosen)
    restarted = resume is None and distributed.restart_count() > 0
    if restarted and (chosen / CHECKPOINTS / "last").is_file():
        resume = resolve_checkpoint(chosen)
    return chosen, resume, restarted


def resume_record(loop: dict[str, Any], checkpoint: Path, world_size: int, elastic: bool) -> dict:
    """The ``metrics.jsonl`` record of a resume (logged at the checkpoint's step).

    ``epoch`` counts the epochs finished before the checkpoint (as the epoch records do) and
    ``batch`` the batches of the next epoch already trained on.
    """
    return {
        "event": "resumed",
        "epoch": int(loop["epoch"]),
        "batch": int(loop["batch"]),
        "checkpoint": checkpoint.name,
        "world_size": world_size,
        "elastic": elastic,  # torchrun restarted the worker group; no resume= was given
    }


def completed_message(
    cfg: Config, run_dir: Path, loop: dict[str, Any], total_steps: int
) -> str | None:
    """Why resuming from ``loop`` (a checkpoint's counters) has nothing to do, or None.

    Complete means: ``summary.json`` was written at this checkpoint's step (the fit ended here),
    and either the run stopped early or no update is left under ``cfg``. A larger
    ``train.epochs`` / ``train.max_steps`` makes a finished (not early-stopped) run resumable.
    """
    summary = read_summary(run_dir)
    step, epoch = int(loop["step"]), int(loop["epoch"])
    if summary is None or summary.get("steps") != step:
        return None  # the fit did not end at this checkpoint: there is work left
    stopped = summary.get("stopped")
    if stopped:  # it ended normally before its length (early stopping, a stop request)
        return (
            f"run {run_dir} already stopped early at epoch {epoch}, step {step} ({stopped}), "
            "so it is complete; nothing to do. To train without early stopping, start a new run "
            "with early_stop.enabled=false"
        )
    # The same test as the Trainer's loop: is another update due?
    left = step < total_steps and (cfg.train.max_steps or epoch < cfg.train.epochs)
    if left:
        return None
    if cfg.train.max_steps:
        longer = f"train.max_steps=N (N > {cfg.train.max_steps}), or train.max_steps=null"
    else:
        longer = f"train.epochs=N (N > {cfg.train.epochs})"
    return (
        f"run {run_dir} is already complete ({epoch} epochs, {step} steps); nothing to do. "
        f"To train longer, resume with {longer}"
    )


def completed_result(run_dir: Path, step: int) -> FitResult:
    """The stored result of a complete run (its ``summary.json``; nothing is written)."""
    summary = read_summary(run_dir) or {}

    def numbers(d: Any) -> dict[str, float]:
        items = d.items() if isinstance(d, dict) else ()
        return {k: v for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}

    best = summary.get("best_checkpoint")
    return FitResult(
        run_dir,
        int(summary.get("steps", step)),
        val=numbers(summary.get("val")),
        test=numbers(summary.get("test")),
        best_checkpoint=Path(best) if best else None,
        stopped=summary.get("stopped"),
    )


@dataclass
class OpenedRun:
    """Where a fit writes and what it continues from (see :func:`open_run`).

    Attributes:
        run_dir: the run directory.
        state: the loop state to start from (fresh, or the checkpoint's).
        complete: why a resumed run has nothing left to do, or None.
        record: the ``metrics.jsonl`` line of this resume, or None for a fresh run.
    """

    run_dir: Path
    state: LoopState
    complete: str | None = None
    record: dict[str, Any] | None = None


def open_run(
    cfg: Config, parts: Parts, run_dir: str | Path | None, plan: resume_policy.ResumePlan | None
) -> OpenedRun:
    """Find the run directory, resume into ``parts`` if asked, write the run's files.

    A failed resume changes no file (it is loaded before anything is written); a complete run's
    files stay as they are; a resume keeps ``config.yaml`` and appends to ``resumes.jsonl``.
    """
    world = parts.engine.world
    where, resume, restarted = locate_run(cfg, run_dir, is_zero=world.is_zero)
    opened = OpenedRun(where, LoopState())
    if resume is not None:
        opened.state, saved = snapshots.restore(parts, resume)
        loop = saved["loop"]
        done = completed_message(cfg, where, loop, parts.total_steps)
        opened.complete = distributed.broadcast_object(done)  # rank 0 read summary.json
        opened.state.resumed_from = [*saved.get("resumed_from", []), opened.state.step]
        opened.record = resume_record(loop, resume, world.size, restarted)
    if world.is_zero and opened.complete is None:
        where.mkdir(parents=True, exist_ok=True)
        if not resume_policy.record(where, plan, opened.state.step):
            write_run_files(where, cfg, parts.data.info)  # a resume keeps config.yaml
        distributed.mark_elastic_run(where)
    return opened

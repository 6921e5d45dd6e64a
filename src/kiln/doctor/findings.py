"""The doctor's findings and its advice table.

A :class:`Finding` says what is wrong, where (a module, a parameter group, a config key or a
``file:line``), why it matters, how to fix it and, when it was measured, what it costs. The
why and the fix of each kind of mistake live in one table, :data:`ADVICE`, keyed by the
finding's code; :func:`finding` builds a finding from it and :func:`format_report` prints a list
of them.

Example:
    >>> print(format_report([finding("grad-in-eval", "eval with autograd on", "eval.py:3")]))
    1. [warning] grad-in-eval: eval with autograd on
      where: eval.py:3
      why:   ...
    <BLANKLINE>
    1 finding: 1 warning
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["ADVICE", "Advice", "Finding", "Severity", "finding", "format_report", "names"]

Severity = Literal["error", "warning", "info"]
_RANK = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One mistake found: what, where, why it matters, how to fix it, what it costs.

    Attributes:
        code: a stable short name (a key of :data:`ADVICE`), e.g. ``missing-zero-grad``.
        what: what was observed.
        where: the module, parameter group, config key or ``file:line`` it points at.
        why: why it matters.
        fix: how to fix it.
        cost: what the doctor measured (time, growth, changed weights), or None.
        severity: ``error`` (wrong results or a crash), ``warning`` (slow or fragile) or
            ``info`` (harmless here but costly elsewhere, e.g. a sync that costs on a GPU).

    Example:
        >>> f = Finding("host-sync", ".item() 1x per step", "train.py:12", "it waits", "log less")
        >>> print(f)
        [warning] host-sync: .item() 1x per step
          where: train.py:12
          why:   it waits
          fix:   log less
    """

    code: str
    what: str
    where: str
    why: str
    fix: str
    cost: str | None = None
    severity: Severity = "warning"

    def __str__(self) -> str:
        lines = [f"[{self.severity}] {self.code}: {self.what}", f"  where: {self.where}"]
        lines += [f"  why:   {self.why}", f"  fix:   {self.fix}"]
        if self.cost:
            lines.append(f"  cost:  {self.cost}")
        return "\n".join(lines)


class Advice(NamedTuple):
    """What a kind of mistake is, why it matters, the fix, and its usual severity."""

    summary: str
    why: str
    fix: str
    severity: Severity = "warning"


ADVICE: dict[str, Advice] = {
    "eval-mode-in-train": Advice(
        "a training step ran with Dropout/BatchNorm layers in eval mode",
        "Dropout does nothing and BatchNorm uses (and stops updating) its running statistics: "
        "the model trains differently from what the code says",
        "call model.train() at the start of every training epoch, after each evaluation",
        "error",
    ),
    "train-mode-in-eval": Advice(
        "evaluation ran with Dropout/BatchNorm layers in train mode",
        "Dropout drops activations at random and BatchNorm normalises with batch statistics "
        "and overwrites its running ones with evaluation data: metrics are noisy and wrong, "
        "and evaluating changes the model",
        "model.eval() before evaluating, model.train() after",
        "error",
    ),
    "grad-in-eval": Advice(
        "evaluation ran the model with autograd on",
        "autograd records every op and keeps activations alive for a backward that never "
        "comes: evaluation is slower and needs more memory",
        "decorate the evaluation with @torch.inference_mode() (or use with torch.no_grad():)",
    ),
    "missing-zero-grad": Advice(
        "gradients of one update were added into the next one's",
        "backward adds into .grad; without zero_grad each update applies the sum of all "
        "gradients so far, which grows step after step: the effective learning rate keeps "
        "rising and training diverges",
        "optimizer.zero_grad(set_to_none=True) right after optimizer.step() (with gradient "
        "accumulation: after the step that ends each group)",
        "error",
    ),
    "graph-kept": Advice(
        "a tensor holding a step's autograd graph outlived the step",
        "a stored loss keeps its whole graph (and, before backward, every saved activation): "
        "memory grows every step until it runs out",
        "store loss.detach() (total += loss.detach(); losses.append(loss.detach())) and call "
        ".item() only when logging",
        "error",
    ),
    "host-sync": Advice(
        ".item()/.cpu()/.tolist()/.numpy()/float() inside the step",
        "on a GPU each call waits until every queued kernel has run, so the CPU cannot queue "
        "the next step ahead and the GPU idles between steps",
        "keep running values on the device (total += loss.detach()) and read them with "
        ".item() every N steps, when logging",
    ),
    "wrong-device": Advice(
        "a module's inputs or tensor attributes are on another device than its weights",
        "ops need all tensors on one device: the step fails with 'Expected all tensors to be "
        "on the same device'",
        "move each batch where the model is: batch.to(device, non_blocking=True) with "
        "device = next(model.parameters()).device (kiln.Engine.to_device does this); "
        "register tensor attributes with self.register_buffer(name, tensor)",
        "error",
    ),
    "frozen-in-optimizer": Advice(
        "parameters with requires_grad=False are in the optimizer",
        "a frozen weight whose .grad is a zero tensor (zero_grad(set_to_none=False), or a "
        "grad from before freezing) is still moved by momentum and weight decay",
        "build the optimizer from [p for p in model.parameters() if p.requires_grad] "
        "(kiln.train.optim.param_groups does), unless you unfreeze them later",
    ),
    "decay-on-bias-norm": Advice(
        "weight decay on biases and normalisation weights",
        "decay pulls biases and norm scales/shifts toward zero without limiting capacity the "
        "way it does for weight matrices; it mostly costs accuracy",
        "give them a param group with weight_decay=0: kiln.train.optim.param_groups(model, "
        "cfg) or build_optimizer does this (optim.no_decay_bias_norm=true)",
    ),
    "batchnorm-batch-1": Advice(
        "BatchNorm in train mode on a batch of one example",
        "BatchNorm1d raises 'Expected more than 1 value per channel'; BatchNorm2d normalises "
        "with one example's statistics and corrupts its running mean/variance",
        "drop_last=True in the loader (data.drop_last=true), a batch size that leaves no "
        "single example, or GroupNorm/LayerNorm",
        "error",
    ),
    "loader-starved": Advice(
        "the step waits for the data loader",
        "the model idles while examples are loaded; with num_workers=0 each one is loaded in "
        "the training process, one after the other, between steps",
        "DataLoader(..., num_workers=N, persistent_workers=True) (data.num_workers), or do the "
        "per-example work (decoding, augmentation) once, or as batched tensor ops",
    ),
    "pin-memory-off": Advice(
        "pin_memory off while the model runs on a GPU",
        "copies from pageable memory go through a staging buffer and cannot overlap compute; "
        ".to(device, non_blocking=True) only overlaps from pinned memory",
        "DataLoader(..., pin_memory=True) and batch.to(device, non_blocking=True) "
        "(data.pin_memory=auto does this on a GPU)",
    ),
    "fp16-on-cpu": Advice(
        "float16 autocast or weights on the CPU",
        "CPUs have no fast float16 matmul: ops are emulated and a step is typically tens of "
        "times slower than float32, while bfloat16 is native on AVX-512/AMX",
        "precision=bf16 (torch.autocast('cpu', dtype=torch.bfloat16), no GradScaler) or fp32; "
        "keep fp16 for GPUs",
    ),
    "nondeterministic": Advice(
        "deterministic asked, but torch's nondeterministic settings are on",
        "nondeterministic kernels (atomic adds in scatter/index backward, cuDNN's autotuner) "
        "make two runs with the same seed differ",
        "kiln.train.reproducibility.set_deterministic(True) before building the model "
        "(use_deterministic_algorithms, cudnn.benchmark off, cudnn.deterministic on, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8)",
        "error",
    ),
    "cudnn-benchmark-shapes": Advice(
        "cudnn.benchmark on while input shapes keep changing",
        "cuDNN autotunes every new input shape (tens of ms each), so varying shapes make every "
        "step slow instead of the first",
        "torch.backends.cudnn.benchmark=False for variable shapes, or pad/bucket inputs to a "
        "few fixed shapes",
    ),
    "clip-before-unscale": Advice(
        "gradients clipped while the GradScaler still scales them",
        "the clip compares scaled gradients (scale x true, 65536 at the start) with the "
        "threshold, so it clips far too hard, by an amount that changes with the scale",
        "scaler.unscale_(optimizer) right before clipping, then scaler.step(optimizer) and "
        "scaler.update() (kiln.Engine.optimizer_step does unscale -> clip -> step)",
        "error",
    ),
    "threads-oversubscribed": Advice(
        "more torch threads than the cores other work leaves free",
        "each parallel op waits for its slowest intra-op thread; when other processes keep "
        "cores busy, that thread waits in the run queue and steps get many times slower "
        "(40-80x measured on a shared two-core host) while nothing reports an error",
        "torch.set_num_threads(k) at the start of the script, or OMP_NUM_THREADS=k in the "
        "environment, with k = the cores left free (the finding gives it); on a dedicated "
        "host, stop the other work instead",
    ),
    "step-failed": Advice(
        "the step (or the evaluation) raised an exception",
        "the doctor could not run all steps; the other findings cover the steps before",
        "fix the error (run the step alone for the full traceback)",
        "error",
    ),
}


def finding(
    code: str, what: str, where: str, cost: str | None = None, severity: Severity | None = None
) -> Finding:
    """A :class:`Finding` with the why, the fix and the severity of ``code`` from :data:`ADVICE`.

    Example:
        >>> finding("grad-in-eval", "eval with autograd on", "eval.py:3").severity
        'warning'
    """
    a = ADVICE[code]
    return Finding(code, what, where, a.why, a.fix, cost, severity or a.severity)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then notes; the order found within each."""
    return sorted(findings, key=lambda f: _RANK.get(f.severity, 3))


def format_report(findings: Sequence[Finding]) -> str:
    """Findings as numbered plain-text blocks and a count by severity.

    Example:
        >>> format_report([])
        'no findings'
    """
    if not findings:
        return "no findings"
    blocks = [f"{i}. {f}" for i, f in enumerate(findings, 1)]
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    tail = ", ".join(
        f"{n} {s}{'s' if n != 1 and s != 'info' else ''}" for s, n in counts.items() if n
    )
    total = f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
    return "\n\n".join(blocks) + f"\n\n{total}: {tail}"


def names(items: Sequence[str], limit: int = 4) -> str:
    """A short comma list: the first ``limit`` items and how many more."""
    shown = ", ".join(items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")

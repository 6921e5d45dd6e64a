"""The doctor's findings, its advice table and its static checks of model, optimizer and loader.

A :class:`Finding` says what is wrong, where (a module, a parameter group, a config key or a
``file:line``), why it matters, how to fix it and, when it was measured, what it costs. The
why and the fix of each kind of mistake live in one table, :data:`ADVICE`, keyed by the
finding's code. The checks here look at objects, not at a running step: parameter groups,
loader settings, global torch flags, and facts the instrumented steps of
:mod:`kiln.perf.doctor` collected (data and step times, input shapes). Each is a function of
those facts, so a check that needs a GPU is exercised by passing the device it would see.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    >>> [f.code for f in optimizer_findings(model, [opt])]
    ['decay-on-bias-norm']
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kiln.config import Config
from kiln.train.optim import _NORM_TYPES

__all__ = [
    "ADVICE",
    "Finding",
    "config_findings",
    "cudnn_shape_findings",
    "finding",
    "format_report",
    "loader_findings",
    "optimizer_findings",
    "starved_loader_findings",
    "tensor_attribute_findings",
    "user_site",
]

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


# ---------------------------------------------------------------------- where


_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
_DOCTOR_FILES = {str(Path(__file__).resolve()), str(Path(__file__).resolve().parent / "doctor.py")}


def in_torch(filename: str) -> bool:
    """Whether ``filename`` belongs to torch itself."""
    return filename.startswith(_TORCH_DIR)


def short_path(filename: str) -> str:
    """``filename`` relative to the working directory when it lies under it.

    Example:
        >>> short_path(os.path.join(os.getcwd(), "train.py"))
        'train.py'
    """
    return os.path.relpath(filename) if Path(filename).is_relative_to(os.getcwd()) else filename


def user_file(filename: str) -> bool:
    """Whether ``filename`` is the user's: not torch, the standard library or the doctor."""
    return not (
        in_torch(filename)
        or filename.startswith(_STDLIB_DIR)
        or filename in _DOCTOR_FILES
        or filename.startswith("<frozen")
    )


def user_site(frame: FrameType | None = None) -> str:
    """``file:line`` of the innermost caller outside torch, the standard library and the doctor.

    Example:
        >>> user_site().startswith("<doctest")
        True
    """
    # sys._getframe(1), not inspect.currentframe(): a frame object of this function holding
    # its caller would be a reference cycle keeping the caller's locals (a loss) alive.
    f: FrameType | None = frame if frame is not None else sys._getframe(1)
    while f is not None:
        if user_file(f.f_code.co_filename):
            return f"{short_path(f.f_code.co_filename)}:{f.f_lineno}"
        f = f.f_back
    return "<unknown>"


def def_site(fn: Any) -> str:
    """``file:line`` where a function (or a callable object's ``__call__``) is defined."""
    target = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(target, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__name__)
    return f"{short_path(code.co_filename)}:{code.co_firstlineno}"


def names(items: Sequence[str], limit: int = 4) -> str:
    """A short comma list: the first ``limit`` items and how many more."""
    shown = ", ".join(items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------- model and optimizer


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def tensor_attribute_findings(model: nn.Module) -> list[Finding]:
    """Plain tensor attributes on another device than their module's weights.

    ``Module.to`` moves parameters and buffers only: a tensor kept as a plain attribute stays
    where it was made and meets the weights on another device in ``forward``.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...         self.mask = torch.ones(2, device="meta")
        >>> [f.where for f in tensor_attribute_findings(Net())]
        ['mask (Net)']
    """
    found = []
    home = model_device(model)
    for mod_name, m in model.named_modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        device = own[0].device if own else home
        for attr, value in vars(m).items():
            if isinstance(value, torch.Tensor) and device is not None and value.device != device:
                full = f"{mod_name}.{attr}" if mod_name else attr
                what = f"tensor attribute {full!r} is on {value.device}, the weights on {device}"
                found.append(finding("wrong-device", what, f"{full} ({type(m).__name__})"))
    return found


def optimizer_findings(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    changed: dict[str, float] | None = None,
    exempt: Iterable[str] = (),
) -> list[Finding]:
    """Frozen parameters in an optimizer, and weight decay on biases/normalisation weights.

    Args:
        model: names the parameters.
        optimizers: the optimizers to look at.
        changed: frozen parameter name -> largest absolute change during the doctor's steps
            (stale zero grads with momentum or decoupled decay still move a frozen weight;
            such a finding is an error).
        exempt: frozen names kept in the optimizer on purpose (unfrozen later).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> _ = model.weight.requires_grad_(False)
        >>> [f.code for f in optimizer_findings(model, [opt])]
        ['frozen-in-optimizer']
    """
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters()
    }
    changed, skip = changed or {}, set(exempt)
    found = []
    for k, opt in enumerate(optimizers):
        label = type(opt).__name__ + (f" #{k + 1}" if len(optimizers) > 1 else "")
        params = [(by_id.get(id(p), "?"), p, g) for g in opt.param_groups for p in g["params"]]
        frozen = [n for n, p, _ in params if not p.requires_grad and n not in skip]
        if frozen:
            moved = {n: changed[n] for n in frozen if changed.get(n, 0.0) > 0}
            cost = None
            if moved:
                worst = max(moved, key=lambda n: moved[n])
                cost = (
                    f"{len(moved)} frozen tensors changed during the doctor's steps (largest "
                    f"|change| {moved[worst]:.3g} in {worst})"
                )
            what = f"{len(frozen)} frozen parameter tensors are in {label}'s param groups"
            where = f"{label} param groups: {names(frozen)}"
            found.append(
                finding("frozen-in-optimizer", what, where, cost, "error" if moved else None)
            )
        decayed = [
            (n, p)
            for n, p, g in params
            if g.get("weight_decay")
            and p.requires_grad
            and (id(p) in norm_ids or p.ndim < 2 or n.rsplit(".", 1)[-1] == "bias")
        ]
        if decayed:
            wd = max(g.get("weight_decay", 0.0) for g in opt.param_groups)
            what = f"weight decay {wd:g} on {len(decayed)} bias/normalisation tensors"
            where = f"{label} param groups: {names([n for n, _ in decayed])}"
            cost = f"{sum(p.numel() for _, p in decayed)} elements decayed toward zero"
            found.append(finding("decay-on-bias-norm", what, where, cost))
    return found


# ---------------------------------------------------------------------- loader


def _loader_facts(loader: Any) -> tuple[int | None, int | None, bool]:
    """(batch size, examples per epoch, drop_last) as far as the loader tells."""
    bs = getattr(loader, "batch_size", None)
    n = None
    for source in ("sampler", "dataset"):
        try:
            n = len(getattr(loader, source))
            break
        except (TypeError, AttributeError):
            continue
    return (bs if isinstance(bs, int) else None), n, bool(getattr(loader, "drop_last", False))


def loader_findings(loader: Any, model: nn.Module, device: torch.device | None) -> list[Finding]:
    """Static loader checks: a batch of one under BatchNorm, pin_memory off with a GPU.

    Args:
        loader: a ``DataLoader`` (or anything with its attributes; others are skipped).
        model: the model (its BatchNorm layers in train mode).
        device: where the model runs (``torch.device("cuda")`` shows what a GPU run reports).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(9, 3))
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        >>> [f.code for f in loader_findings(DataLoader(ds, batch_size=4), model, None)]
        ['batchnorm-batch-1']
    """
    found = []
    bs, n, drop = _loader_facts(loader)
    bns = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.training
    ]
    last = None if n is None or bs is None or drop else n % bs
    if bns and (bs == 1 or last == 1):
        which = "every batch has" if bs == 1 else f"the last batch ({n} examples % {bs}) has"
        what = f"{which} one example and the model has BatchNorm layers in train mode"
        where = f"loader (batch_size={bs}, drop_last={drop}); BatchNorm: {names(bns)}"
        found.append(finding("batchnorm-batch-1", what, where))
    pin = getattr(loader, "pin_memory", None)
    if device is not None and device.type == "cuda" and pin is False:
        what = "the loader does not pin memory while the model runs on a GPU"
        found.append(finding("pin-memory-off", what, f"{type(loader).__name__}(pin_memory=False)"))
    return found


def starved_loader_findings(
    loader: Any, data_s: Sequence[float], step_s: Sequence[float]
) -> list[Finding]:
    """The loader is the bottleneck: fetching a batch is a large share of each iteration.

    Flags a median fetch time of at least 2 ms that is at least 30% of fetch + step time
    (medians over the steps: the first batch also pays for starting workers).

    Example:
        >>> [f.code for f in starved_loader_findings(None, [0.05, 0.05], [0.001, 0.001])]
        ['loader-starved']
    """
    if not data_s or not step_s:
        return []
    data, step = statistics.median(data_s), statistics.median(step_s)
    share = data / (data + step)
    if data < 2e-3 or share < 0.3:
        return []
    workers = getattr(loader, "num_workers", 0)
    dataset = getattr(loader, "dataset", None)
    what = f"fetching a batch takes {data * 1e3:.1f} ms, the step {step * 1e3:.1f} ms"
    where = f"{type(loader).__name__}(num_workers={workers})"
    where += f" over {type(dataset).__name__}" if dataset is not None else ""
    cost = f"{share:.0%} of each iteration waits for data ({os.cpu_count()} CPU cores here)"
    return [finding("loader-starved", what, where, cost)]


# ---------------------------------------------------------------------- config and flags


def config_findings(
    cfg: Config | None, device: torch.device | None, *, fp16_seen: bool = False
) -> list[Finding]:
    """fp16 on the CPU, and nondeterministic settings when deterministic mode was asked.

    Args:
        cfg: the job's config (None: only what the steps saw).
        device: where the model runs.
        fp16_seen: the steps ran float16 autocast or float16 weights on the CPU.

    Example:
        >>> from kiln.config import load_config
        >>> cfg = load_config(None, ["precision=fp16", "allow_fp16_cpu=true"])
        >>> [f.code for f in config_findings(cfg, torch.device("cpu"))]
        ['fp16-on-cpu']
    """
    found = []
    asked = cfg is not None and cfg.precision == "fp16"
    if (device is None or device.type == "cpu") and (fp16_seen or asked):
        where = "config: precision=fp16" if asked else "float16 autocast/weights on the CPU"
        found.append(finding("fp16-on-cpu", "float16 runs on the CPU", where))
    if cfg is not None and cfg.deterministic:
        bad = []
        if not torch.are_deterministic_algorithms_enabled():
            bad.append("torch.use_deterministic_algorithms is off")
        if torch.backends.cudnn.benchmark:
            bad.append("torch.backends.cudnn.benchmark is on")
        if device is not None and device.type == "cuda":
            if not torch.backends.cudnn.deterministic:
                bad.append("torch.backends.cudnn.deterministic is off")
            if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                bad.append("CUBLAS_WORKSPACE_CONFIG is unset")
        if bad:
            what = "deterministic=true, but " + "; ".join(bad)
            found.append(finding("nondeterministic", what, "config: deterministic=true"))
    return found


_CUDNN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.RNNBase)


def cudnn_shape_findings(
    model: nn.Module,
    shapes: Sequence[tuple[tuple[int, ...], ...]],
    device: torch.device | None,
    *,
    benchmark: bool | None = None,
) -> list[Finding]:
    """``cudnn.benchmark`` on while the model's input shapes keep changing.

    Flags three or more distinct input shapes among the steps (a steady shape plus a short
    last batch is fine) when the model has convolution/RNN layers and runs on CUDA.

    Args:
        model: its convolution/RNN layers are what cuDNN runs.
        shapes: the model's input shapes, one entry per step.
        device: where the model runs (only CUDA uses cuDNN).
        benchmark: the flag (default: ``torch.backends.cudnn.benchmark``).

    Example:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> seen = [((1, 1, 8, s),) for s in (8, 9, 10)]
        >>> cuda = torch.device("cuda")
        >>> [f.code for f in cudnn_shape_findings(conv, seen, cuda, benchmark=True)]
        ['cudnn-benchmark-shapes']
    """
    if benchmark is None:
        benchmark = torch.backends.cudnn.benchmark
    if not benchmark or device is None or device.type != "cuda":
        return []
    if not any(isinstance(m, _CUDNN_TYPES) for m in model.modules()):
        return []
    distinct = list(dict.fromkeys(shapes))
    if len(distinct) < 3:
        return []
    shown = ", ".join("x".join(map(str, s[0])) if s else "()" for s in distinct[:4])
    what = f"{len(distinct)} input shapes in {len(shapes)} steps with cudnn.benchmark on"
    where = f"torch.backends.cudnn.benchmark=True; input shapes {shown}"
    return [finding("cudnn-benchmark-shapes", what, where)]

"""The doctor's static checks of model, optimizer, loader and config.

The checks here look at objects, not at a running step: parameter groups, loader settings,
global torch flags, and facts the instrumented steps of :mod:`kiln.doctor.steps` collected (data
and step times, input shapes). Each is a function of those facts, so a check that needs a GPU
is exercised by passing the device it would see. Each returns a list of
:class:`~kiln.doctor.findings.Finding`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    >>> [f.code for f in optimizer_findings(model, [opt])]
    ['decay-on-bias-norm']
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kiln.config import Config
from kiln.doctor.findings import Finding, finding, names
from kiln.train.optim import _NORM_TYPES

__all__ = [
    "config_findings",
    "cudnn_shape_findings",
    "loader_findings",
    "model_device",
    "optimizer_findings",
    "starved_loader_findings",
    "tensor_attribute_findings",
]


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

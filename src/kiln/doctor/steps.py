"""The training doctor: run a few instrumented steps of a loop and report its common mistakes.

:func:`check` calls a user's own ``step_fn(batch)`` on a few batches (then ``eval_fn(batch)``
on the same batches, when given) and watches: module modes and grad mode at each forward,
input and weight devices, gradients that survive an optimizer step, autograd graphs that
outlive their step, host syncs and their ``file:line``, clipping while a GradScaler still
scales, and time spent waiting for data; before the steps it reads the host's load against
torch's thread count (:mod:`kiln.doctor.threads`). Static checks of the model,
optimizer, loader and config complete it (:mod:`kiln.doctor.checks`). Each mistake
comes back as a :class:`~kiln.doctor.findings.Finding`: what, where, why it matters, how
to fix it and, when it can be measured, the cost.

The steps are real and update the weights; the model's parameters, buffers and module modes,
the given optimizer's and scaler's state, and the random generators are restored afterwards.
The watching uses torch's global module/optimizer hooks and patches a few ``Tensor`` methods
for the duration of the call (:mod:`kiln.doctor.probe`); it slows the steps a little.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    >>> def step(batch):
    ...     x, y = batch
    ...     loss = nn.functional.cross_entropy(model(x), y)
    ...     loss.backward()
    ...     opt.step()             # no opt.zero_grad(): gradients pile up
    >>> [f.code for f in check(model, loader, step, optimizer=opt)]
    ['missing-zero-grad']
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from kiln.config import Config, validate
from kiln.doctor.checks import (
    config_findings,
    cudnn_shape_findings,
    loader_findings,
    model_device,
    optimizer_findings,
    starved_loader_findings,
    tensor_attribute_findings,
)
from kiln.doctor.findings import Finding, finding, names, sort_findings
from kiln.doctor.probe import Probe
from kiln.doctor.sites import def_site, short_path
from kiln.doctor.threads import HostLoad, host_load, oversubscribed, thread_findings
from kiln.train.reproducibility import rng_state, set_rng_state

__all__ = ["Finding", "check"]


def check(
    model: nn.Module,
    loader: Iterable[Any],
    step_fn: Callable[[Any], Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    eval_fn: Callable[[Any], Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    steps: int = 3,
    config: Config | Mapping[str, Any] | None = None,
    host: HostLoad | None = None,
) -> list[Finding]:
    """Run ``steps`` instrumented calls of ``step_fn`` (then ``eval_fn``) and report mistakes.

    Args:
        model: the model the steps train (hooks watch its modules).
        loader: yields the batches passed to ``step_fn``; a ``DataLoader``'s settings are
            checked too (workers, pin_memory, a last batch of one).
        step_fn: one training step on one batch: forward, loss, backward and, on update
            steps, the optimizer step. Its return value is dropped.
        optimizer: the optimizer, for the static checks (frozen parameters, weight decay on
            biases/norms) and to restore its state; optimizers stepped inside ``step_fn`` are
            found without it.
        eval_fn: one evaluation step on one batch, called on the same batches after the
            training steps (``lambda b: evaluate(model, [b])`` for a loop over a loader).
        scaler: the fp16 ``GradScaler``; scalers used in the step are found without it.
        steps: training steps to run (2 or more to see what carries over between steps).
        config: a kiln :class:`~kiln.config.Config` or a mapping of its keys (e.g.
            ``{"deterministic": True}``): what was asked, checked against what happens.
        host: the host's cores, load and torch's threads (default: read before the steps,
            :func:`~kiln.doctor.threads.host_load`); more torch threads than the load
            leaves cores for is reported as ``threads-oversubscribed``.

    Returns:
        The findings, errors first; an empty list when nothing was found.

    Raises:
        ValueError: ``steps`` < 1, or an invalid ``config``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def step(x):
        ...     loss = model(x).square().mean()
        ...     loss.backward()
        ...     opt.step()
        ...     opt.zero_grad(set_to_none=True)
        >>> check(model, [torch.randn(4, 4)] * 3, step, optimizer=opt)
        []
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the training steps to watch), got {steps}")
    cfg = config if config is None or isinstance(config, Config) else validate(dict(config))
    device = model_device(model)
    host = host if host is not None else host_load()  # before our own steps add to the load
    saved = _Saved(model, optimizer, scaler)
    probe = Probe(model, optimizer, scaler)
    try:
        with probe:
            batches = probe.train(loader, step_fn, steps)
            leaked = probe.leaked_tensors()
            if eval_fn is not None and batches and probe.failed is None:
                probe.evaluate(eval_fn, batches)
        findings = _findings(probe, step_fn, leaked)
        del leaked
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        changed = saved.changes(frozen)
        fp16 = probe.fp16_site is not None or any(
            p.dtype == torch.float16 and p.device.type == "cpu" for p in model.parameters()
        )
        for f in config_findings(cfg, device, fp16_seen=fp16):
            if f.code == "fp16-on-cpu":
                where = f"{f.where}; forward at {probe.fp16_site}" if probe.fp16_site else f.where
                f = replace(f, where=where, cost=_fp16_cost(model, probe.example))
            findings.append(f)
        if oversubscribed(host):
            findings += thread_findings(host, _threads_cost(model, probe.example, host))
    finally:
        saved.restore()
    findings += tensor_attribute_findings(model)
    exempt = _unfrozen_later(model, cfg)
    findings += optimizer_findings(model, probe.optimizers, changed=changed, exempt=exempt)
    static = loader_findings(loader, model, device)
    if any(f.code == "batchnorm-batch-1" for f in static):  # one finding, at the loader
        findings = [f for f in findings if f.code != "batchnorm-batch-1"]
    findings += static
    findings += starved_loader_findings(loader, probe.data_s, probe.step_s)
    findings += cudnn_shape_findings(model, probe.shapes, device)
    return sort_findings(findings)


def _unfrozen_later(model: nn.Module, cfg: Config | None) -> set[str]:
    """Names kiln's gradual unfreezing keeps in the optimizer on purpose."""
    if cfg is None or not cfg.freeze.unfreeze_at:
        return set()
    from kiln.algorithms.freezing import matching_parameters

    patterns = [p for group in cfg.freeze.unfreeze_at.values() for p in group]
    return set(matching_parameters(model, patterns))


def _timed_step(model: nn.Module, example: tuple[Any, ...], *, fp16: bool = False) -> float:
    """Median seconds of 5 forward + backward passes after a warm-up.

    The backward uses ``torch.autograd.grad``, so no ``.grad`` is written.

    Raises:
        RuntimeError, TypeError, AttributeError: fp16 weights, or a non-tensor output.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(6):  # the first is a warm-up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            out = model(*example)
        torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _fp16_cost(model: nn.Module, example: tuple[Any, ...] | None) -> str | None:
    """Forward + backward time under CPU fp16 autocast against fp32 (median of 5)."""
    if example is None or not any(p.requires_grad for p in model.parameters()):
        return None
    try:
        slow, fast = _timed_step(model, example, fp16=True), _timed_step(model, example)
    except (RuntimeError, TypeError, AttributeError):  # fp16 weights, or a non-tensor output
        return None
    ratio = slow / max(fast, 1e-9)
    return (
        f"forward + backward {slow * 1e3:.2f} ms in fp16 vs {fast * 1e3:.2f} ms in fp32 "
        f"({ratio:.1f}x)"
    )


def _threads_cost(model: nn.Module, example: tuple[Any, ...] | None, host: HostLoad) -> str | None:
    """Forward + backward time with the host's torch threads against the suggested count."""
    from kiln.doctor.threads import suggested_threads

    k = suggested_threads(host)
    if example is None or not any(p.requires_grad for p in model.parameters()):
        return None
    was = torch.get_num_threads()
    try:
        times = {}
        for n in (host.threads, k):
            torch.set_num_threads(n)
            times[n] = _timed_step(model, example)
    except (RuntimeError, TypeError, AttributeError):  # a non-tensor output
        return None
    finally:
        torch.set_num_threads(was)
    return (
        f"forward + backward {times[host.threads] * 1e3:.2f} ms with {host.threads} threads vs "
        f"{times[k] * 1e3:.2f} ms with {k} ({times[host.threads] / max(times[k], 1e-9):.1f}x)"
    )


class _Saved:
    """What check() restores: weights, grads, buffers, modes, optimizer, scaler, generators."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        self.opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.scale = copy.deepcopy(vars(scaler)) if scaler is not None else None
        self.rng = rng_state()
        self.modes = [(m, m.training) for m in model.modules()]

    def changes(self, params: list[str]) -> dict[str, float]:
        """Largest absolute change of each named parameter since the snapshot."""
        current = dict(self.model.named_parameters())
        out = {}
        for n in params:
            before = self.weights.get(n)
            if before is not None and before.shape == current[n].shape and before.numel():
                out[n] = float((current[n].detach().float() - before.float()).abs().max())
        return out

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)
        for p, grad in self.grads:
            p.grad = grad
        for m, mode in self.modes:
            m.training = mode
        if self.optimizer is not None and self.opt is not None:
            self.optimizer.load_state_dict(self.opt)
        if self.scaler is not None and self.scale is not None:
            vars(self.scaler).update(self.scale)
        set_rng_state(self.rng)


# ---------------------------------------------------------------------- findings


def _findings(
    probe: Probe, step_fn: Callable[[Any], Any], leaked: list[torch.Tensor]
) -> list[Finding]:
    """The findings of what the probe recorded."""
    out = [probe.failed] if probe.failed is not None else []
    steps = max(probe.ran, 1)
    modules = probe.wrong_mode["train"]
    if modules:
        what = f"{len(modules)} Dropout/BatchNorm layers were in eval mode in a training step"
        where = f"{names(list(modules.values()))}; model called at {probe.mode_site['train']}"
        out.append(finding("eval-mode-in-train", what, where))
    modules = probe.wrong_mode["eval"]
    if modules:
        what = f"{len(modules)} Dropout/BatchNorm layers were in train mode in evaluation"
        where = f"{names(list(modules.values()))}; model called at {probe.mode_site['eval']}"
        cost = None
        if probe.bn_changed:
            cost = f"evaluation changed the running statistics of {names(probe.bn_changed)}"
        out.append(finding("train-mode-in-eval", what, where, cost))
    if probe.grad_eval_site is not None:
        what = "the evaluation ran the model with autograd on"
        where = f"model called at {probe.grad_eval_site}"
        out.append(finding("grad-in-eval", what, where, probe.eval_cost))
    if probe.accumulated:
        what = f"gradients of {len(probe.accumulated)} parameter tensors were added into the "
        what += "next update's (no zero_grad after optimizer.step())"
        norms = [float(n) for n in probe.norms]
        cost = None
        if len(norms) >= 2 and norms[0] > 0:
            shown = ", ".join(f"{n:.3g}" for n in norms)
            cost = f"gradient norm at each update: {shown} (x{norms[-1] / norms[0]:.2g})"
        out.append(
            finding("missing-zero-grad", what, f"optimizer.step() at {probe.step_site}", cost)
        )
    if leaked:
        name, site = _holder(step_fn, leaked)
        holder = repr(name) if name else "a tensor held outside the step function"
        later = probe.ran - probe.graph_step - 1
        what = f"{holder} keeps step {probe.graph_step + 1}'s autograd graph alive "
        what += f"after {later} more steps"
        cost = f"{len(probe.graph)} autograd nodes of step {probe.graph_step + 1} still referenced"
        out.append(finding("graph-kept", what, site, cost))
    for site, (labels, calls, secs, on_device) in probe.syncs.items():
        what = f"{'/'.join(sorted(labels))} called {calls / steps:.3g}x per step"
        what += "" if on_device else " (on CPU tensors here; a sync on a GPU)"
        cost = f"{secs / steps * 1e3:.3f} ms per step waiting in these calls"
        out.append(finding("host-sync", what, site, cost, None if on_device else "info"))
    for what, label, site in probe.devices.values():
        out.append(finding("wrong-device", what, f"{label}, called at {site}"))
    for where in probe.bn1.values():
        out.append(finding("batchnorm-batch-1", "BatchNorm got a batch of one example", where))
    out += _clip_findings(probe)
    return out


def _clip_findings(probe: Probe) -> list[Finding]:
    for clip in probe.clips:
        owners = [
            o
            for o in probe.optimizers
            if any(id(p) in clip["params"] for g in o.param_groups for p in g["params"])
        ]
        unscaled = clip["unscaled"]
        if all(id(o) in unscaled for o in owners) if owners else unscaled:
            continue
        cost = None
        if clip["norm"] is not None and clip["scale"] is not None:
            seen, scale = float(clip["norm"]), float(clip["scale"])
            cost = (
                f"the clip saw a gradient norm of {seen:.3g} at loss scale {scale:g}: the "
                f"true norm is {seen / scale:.3g}"
            )
        what = f"clip_grad_{clip['kind']}_ ran on gradients still multiplied by the loss scale"
        return [finding("clip-before-unscale", what, f"clip at {clip['site']}", cost)]
    return []


def _holds(value: Any, leaked: list[torch.Tensor]) -> bool:
    """Whether ``value`` is a leaked tensor or a list/tuple/set/dict/deque holding one."""
    if isinstance(value, dict):
        value = list(value.values())
    items = value if isinstance(value, (list, tuple, set)) or hasattr(value, "maxlen") else [value]
    return any(v is t for v in items for t in leaked)


def _holder(step_fn: Callable[[Any], Any], leaked: list[torch.Tensor]) -> tuple[str | None, str]:
    """The name in ``step_fn``'s reach holding a leaked tensor, and the line that stores it."""
    fn = inspect.unwrap(getattr(step_fn, "__func__", step_fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return None, def_site(step_fn)
    spaces: list[tuple[str, Any]] = []
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            spaces.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    spaces += [(n, fn.__globals__[n]) for n in code.co_names if n in fn.__globals__]
    owner = getattr(step_fn, "__self__", None)
    spaces += [(f"self.{k}", v) for k, v in getattr(owner, "__dict__", {}).items()]
    name = next((n for n, v in spaces if _holds(v, leaked)), None)
    if name is None:
        return None, def_site(step_fn)
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return name, def_site(step_fn)
    stores = (f"{name}.append(", f"{name}.extend(", f"{name} +=", f"{name} = {name} +", f"{name}[")
    hits = [i for i, line in enumerate(lines) if any(s in line for s in stores)]
    hits = hits or [i for i, line in enumerate(lines[1:], 1) if name in line]
    return name, f"{short_path(code.co_filename)}:{start + (hits[0] if hits else 0)}"

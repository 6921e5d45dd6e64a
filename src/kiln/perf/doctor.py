"""The training doctor: run a few instrumented steps of a loop and report its common mistakes.

:func:`check` calls a user's own ``step_fn(batch)`` on a few batches (then ``eval_fn(batch)``
on the same batches, when given) and watches: module modes and grad mode at each forward,
input and weight devices, gradients that survive an optimizer step, autograd graphs that
outlive their step, host syncs and their ``file:line``, clipping while a GradScaler still
scales, and time spent waiting for data. Static checks of the model, optimizer, loader and
config complete it (:mod:`kiln.perf.doctor_checks`). Each mistake comes back as a
:class:`~kiln.perf.doctor_checks.Finding`: what, where, why it matters, how to fix it and,
when it can be measured, the cost.

The steps are real and update the weights; the model's parameters, buffers and module modes,
the given optimizer's and scaler's state, and the random generators are restored afterwards.
The watching uses torch's global module/optimizer hooks and patches a few ``Tensor`` methods
for the duration of the call; it slows the steps a little.

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
import gc
import inspect
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import FrameType
from typing import Any

import torch
import torch.nn.utils.clip_grad as clip_module
import torch.optim.optimizer as optim_module
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from kiln.config import Config, validate
from kiln.perf.doctor_checks import (
    Finding,
    config_findings,
    cudnn_shape_findings,
    def_site,
    finding,
    in_torch,
    loader_findings,
    model_device,
    names,
    optimizer_findings,
    short_path,
    sort_findings,
    starved_loader_findings,
    tensor_attribute_findings,
    user_file,
    user_site,
)
from kiln.train.reproducibility import rng_state, set_rng_state

__all__ = ["Finding", "check"]

_MISSING = object()
_SYNCS = {"item": ".item()", "tolist": ".tolist()", "numpy": ".numpy()", "cpu": ".cpu()"}
_SYNCS["__float__"] = "float()"
_GRAPH_LIMIT = 20_000  # autograd nodes walked per graph: bounds the cost on huge models


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
    saved = _Saved(model, optimizer, scaler)
    probe = _Probe(model, optimizer, scaler)
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


def _fp16_cost(model: nn.Module, example: tuple[Any, ...] | None) -> str | None:
    """Forward + backward time under CPU fp16 autocast against fp32 (median of 5).

    The backward uses ``torch.autograd.grad``, so no ``.grad`` is written.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if example is None or not params:
        return None

    def timed(fp16: bool) -> float:
        times = []
        for _ in range(6):  # the first is a warm-up
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                out = model(*example)
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    try:
        slow, fast = timed(True), timed(False)
    except (RuntimeError, TypeError, AttributeError):  # fp16 weights, or a non-tensor output
        return None
    ratio = slow / max(fast, 1e-9)
    return (
        f"forward + backward {slow * 1e3:.2f} ms in fp16 vs {fast * 1e3:.2f} ms in fp32 "
        f"({ratio:.1f}x)"
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


class _Probe:
    """Hooks and patches that watch the steps and record what they see."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model = model
        self.names = {id(m): (n or type(m).__name__) for n, m in model.named_modules()}
        inner = [getattr(model, a, None) for a in ("module", "_orig_mod")]  # DDP, compile
        self.roots = {id(model)} | {id(m) for m in inner if isinstance(m, nn.Module)}
        self.optimizers: list[torch.optim.Optimizer] = [optimizer] if optimizer else []
        self.scalers: list[torch.amp.GradScaler] = [scaler] if scaler is not None else []
        self.phase, self.step, self.ran = "idle", -1, 0
        self.data_s: list[float] = []
        self.step_s: list[float] = []
        self.shapes: list[tuple[tuple[int, ...], ...]] = []
        self.example: tuple[Any, ...] | None = None  # the first model input, for fp16 timing
        self.fp16_site: str | None = None
        self.wrong_mode: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
        self.mode_site: dict[str, str] = {}
        self.grad_eval_site: str | None = None
        self.eval_cost: str | None = None
        self.bn_changed: list[str] = []
        self.devices: dict[str, tuple[str, str, str]] = {}  # module -> (what, label, site)
        self.bn1: dict[str, str] = {}
        self.syncs: dict[str, list[Any]] = {}  # site -> [labels, calls, seconds, on a device]
        self.stepped: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.accumulated: set[int] = set()
        self.norms: list[torch.Tensor] = []
        self.step_site: str | None = None
        self.clips: list[dict[str, Any]] = []
        self.scaled: set[int] = set()  # scalers that scaled a loss in this step
        self.graph: list[Any] = []  # autograd nodes of the first graph (held: ids stay unique)
        self.graph_ids: set[int] = set()
        self.graph_step = -1
        self.failed: Finding | None = None
        self._undo: list[tuple[Any, str, Any]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Probe:
        try:
            self._install()
        except BaseException:
            self.__exit__()  # what was installed comes off again
            raise
        return self

    def _install(self) -> None:
        self._handles += [
            nn.modules.module.register_module_forward_pre_hook(self._pre_forward),
            optim_module.register_optimizer_step_pre_hook(self._before_step),
            optim_module.register_optimizer_step_post_hook(self._after_step),
        ]
        for p in self.model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._grad_hook(p)))
        for name, label in _SYNCS.items():
            self._patch(torch.Tensor, name, self._sync_wrapper(getattr(torch.Tensor, name), label))
        self._patch(torch.autograd, "backward", self._backward_wrapper(torch.autograd.backward))
        self._patch(torch.amp.GradScaler, "scale", self._scale_wrapper(torch.amp.GradScaler.scale))
        norm = getattr(clip_module, "_clip_grads_with_norm_", None)  # what clip_grad_norm_ calls
        if norm is not None:
            self._patch(clip_module, "_clip_grads_with_norm_", self._clip_wrapper(norm, "norm"))
        value = self._clip_wrapper(clip_module.clip_grad_value_, "value")
        self._patch(clip_module, "clip_grad_value_", value)
        self._patch(torch.nn.utils, "clip_grad_value_", value)

    def __exit__(self, *exc: object) -> None:
        self.phase = "idle"
        for h in self._handles:
            h.remove()
        for owner, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._handles, self._undo = [], []

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._undo.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, new)

    # ------------------------------------------------------------------ running

    def train(self, loader: Iterable[Any], step_fn: Callable[[Any], Any], steps: int) -> list[Any]:
        """Run the steps, timing the fetch and the step; returns the batches."""
        batches = []
        it = iter(loader)
        device = model_device(self.model)
        for k in range(steps):
            t0 = time.perf_counter()
            batch = next(it, _MISSING)
            if batch is _MISSING:
                break
            t1 = time.perf_counter()
            self.phase, self.step = "train", k
            self.scaled.clear()
            explained = len(self.devices) + len(self.bn1)
            try:
                step_fn(batch)
            except Exception as exc:
                if len(self.devices) + len(self.bn1) == explained:  # no finding explains it
                    self.failed = _failure(exc, "training step", step_fn)
                break
            finally:
                self.phase = "idle"
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.data_s.append(t1 - t0)
            self.step_s.append(time.perf_counter() - t1)
            self.ran += 1
            batches.append(batch)
        return batches

    def evaluate(self, eval_fn: Callable[[Any], Any], batches: list[Any]) -> None:
        """Run ``eval_fn`` on the batches; measure what autograd or train mode cost there."""
        bns = {
            n: m.running_mean.clone()
            for n, m in self.model.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None
        }
        t0 = time.perf_counter()
        self.phase = "eval"
        try:
            for batch in batches:
                eval_fn(batch)
        except Exception as exc:
            self.failed = _failure(exc, "evaluation", eval_fn)
            return
        finally:
            self.phase = "idle"
        took = time.perf_counter() - t0
        modules = dict(self.model.named_modules())
        self.bn_changed = [
            f"{n} ({type(modules[n]).__name__})"
            for n, before in bns.items()
            if not torch.equal(before, modules[n].running_mean)
        ]
        if self.grad_eval_site is not None:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    for batch in batches:
                        eval_fn(batch)
            except Exception:  # the evaluation needs autograd after all: no cost to report
                return
            fast = time.perf_counter() - t0
            self.eval_cost = (
                f"{len(batches)} evaluation batches took {took * 1e3:.1f} ms with autograd on, "
                f"{fast * 1e3:.1f} ms under torch.inference_mode()"
            )

    def leaked_tensors(self) -> list[torch.Tensor]:
        """Live tensors whose graph reaches the first graph's nodes, after later steps ran."""
        if not self.graph_ids or self.ran <= self.graph_step + 1:
            return []
        found: list[torch.Tensor] = []
        for collected in (False, True):  # a full collection (slow) only to confirm a hit
            if collected:
                found.clear()  # these references would keep the candidates alive
                gc.collect()
            found = [
                obj
                for obj in gc.get_objects()
                if issubclass(type(obj), torch.Tensor)  # type(): no __class__ lookup on proxies
                and obj.grad_fn is not None
                and _reaches(obj.grad_fn, self.graph_ids)
            ]
            if not found:
                return []
        return found

    # ------------------------------------------------------------------ hooks

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.phase == "idle" or id(module) not in self.names:
            return
        name = self.names[id(module)]
        if id(module) in self.roots:
            self._root(args)
        if isinstance(module, (_DropoutNd, _BatchNorm)):
            self._mode(module, name)
        own = next(iter([*module._parameters.values(), *module._buffers.values()]), None)
        if own is not None and name not in self.devices:
            for t in _tensors(args):
                if t.device != own.device:
                    what = (
                        f"{name} ({type(module).__name__}) got an input on {t.device}; its "
                        f"weights are on {own.device}"
                    )
                    self.devices[name] = (what, f"{name} ({type(module).__name__})", user_site())
                    break
        if isinstance(module, _BatchNorm) and module.training and self.phase == "train":
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and x.dim() >= 2 and x.shape[0] == 1 and name not in self.bn1:
                self.bn1[name] = (
                    f"{name} ({type(module).__name__}), input {tuple(x.shape)} at {user_site()}"
                )

    def _root(self, args: tuple[Any, ...]) -> None:
        if self.phase == "train":
            if len(self.shapes) == self.step:
                self.shapes.append(tuple(tuple(t.shape) for t in _tensors(args)))
            if self.example is None:
                self.example = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            fp16 = torch.is_autocast_enabled("cpu") and (
                torch.get_autocast_dtype("cpu") == torch.float16
            )
            if fp16 and self.fp16_site is None:
                self.fp16_site = user_site()
        elif self.grad_eval_site is None and torch.is_grad_enabled():
            self.grad_eval_site = user_site()

    def _mode(self, module: nn.Module, name: str) -> None:
        if isinstance(module, _BatchNorm):
            own = list(module.parameters(recurse=False))
            if self.phase == "train" and own and not any(p.requires_grad for p in own):
                return  # a frozen BatchNorm kept in eval on purpose (kiln's freeze.bn_eval)
            if not module.track_running_stats:
                return  # batch statistics in both modes
        wrong = module.training != (self.phase == "train")
        if wrong and name not in self.wrong_mode[self.phase]:
            self.wrong_mode[self.phase][name] = f"{name} ({type(module).__name__})"
            self.mode_site.setdefault(self.phase, user_site())

    def _grad_hook(self, p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            # Runs before backward adds into p.grad: an untouched grad from the last update?
            record = self.stepped.pop(id(p), None)
            if record is not None and self.phase == "train":
                g = p.grad
                if g is not None and record[0]() is g and g._version == record[1]:
                    self.accumulated.add(id(p))

        return hook

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.phase != "train":
            return
        if all(o is not opt for o in self.optimizers):
            self.optimizers.append(opt)
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            self.norms.append(torch.nn.utils.get_total_norm(grads).detach().float())
        self.step_site = self.step_site or user_site()

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.phase != "train":
            return
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.stepped[id(p)] = (weakref.ref(p.grad), p.grad._version)

    # ------------------------------------------------------------------ patches

    def _sync_wrapper(self, orig: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.phase != "train":
                return orig(t, *args, **kwargs)
            t0 = time.perf_counter()
            out = orig(t, *args, **kwargs)
            # The caller's frame; inspect.currentframe() would make a reference cycle (this
            # frame -> caller) that keeps the step's locals alive until a collection.
            self._on_sync(label, t, time.perf_counter() - t0, sys._getframe(1))
            return out

        return wrapper

    def _on_sync(self, label: str, t: torch.Tensor, secs: float, frame: FrameType | None) -> None:
        f = frame
        while f is not None and in_torch(f.f_code.co_filename):
            if f.f_code.co_filename.endswith("grad_scaler.py"):
                return  # the GradScaler's own inf check: inherent to fp16 loss scaling
            f = f.f_back
        if frame is None or (t.device.type == "cpu" and in_torch(frame.f_code.co_filename)):
            return  # torch reading a CPU scalar (an optimizer's step count): no device sync
        entry = self.syncs.setdefault(user_site(frame), [set(), 0, 0.0, False])
        entry[0].add(label)
        entry[1] += 1
        entry[2] += secs
        entry[3] = entry[3] or t.device.type != "cpu"

    def _backward_wrapper(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if self.phase == "train" and not self.graph_ids:
                roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
                todo = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn]
                while todo and len(self.graph) < _GRAPH_LIMIT:
                    node = todo.pop()
                    if id(node) in self.graph_ids:
                        continue
                    if node.name() != "torch::autograd::AccumulateGrad":  # shared by all graphs
                        self.graph.append(node)
                        self.graph_ids.add(id(node))
                    todo += [n for n, _ in node.next_functions if n is not None]
                self.graph_step = self.step
            return orig(tensors, *args, **kwargs)

        return backward

    def _scale_wrapper(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def scale(scaler: torch.amp.GradScaler, outputs: Any) -> Any:
            if self.phase == "train":
                self.scaled.add(id(scaler))
                if all(s is not scaler for s in self.scalers):
                    self.scalers.append(scaler)
            return orig(scaler, outputs)

        return scale

    def _clip_wrapper(self, orig: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def clip(*args: Any, **kwargs: Any) -> Any:
            active = [s for s in self.scalers if id(s) in self.scaled and s.is_enabled()]
            if self.phase == "train" and active:
                params = kwargs.pop("parameters", args[0] if args else [])
                params = [params] if isinstance(params, torch.Tensor) else list(params)
                args = (params, *args[1:])
                norm = kwargs.get("total_norm", args[2] if len(args) > 2 else None)
                states = [dict(s._per_optimizer_states) for s in active]
                self.clips.append(
                    {
                        "site": user_site(),
                        "kind": kind,
                        "params": {id(p) for p in params},
                        "unscaled": {
                            k
                            for st in states
                            for k, v in st.items()
                            if v.get("stage") is OptState.UNSCALED
                        },
                        "norm": None if norm is None else norm.detach().clone(),
                        "scale": None if active[0]._scale is None else active[0]._scale.clone(),
                    }
                )
            return orig(*args, **kwargs)

        return clip


# ---------------------------------------------------------------------- findings


def _findings(
    probe: _Probe, step_fn: Callable[[Any], Any], leaked: list[torch.Tensor]
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


def _clip_findings(probe: _Probe) -> list[Finding]:
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


# ---------------------------------------------------------------------- helpers


def _tensors(args: Any) -> list[torch.Tensor]:
    """Tensors among forward arguments (one level into lists, tuples and dicts)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
        elif isinstance(a, dict):
            out += [t for t in a.values() if isinstance(t, torch.Tensor)]
    return out


def _reaches(root: Any, targets: set[int]) -> bool:
    """Whether the autograd graph below ``root`` holds a node whose id is in ``targets``."""
    seen: set[int] = set()
    todo = [root]
    while todo and len(seen) < _GRAPH_LIMIT:
        node = todo.pop()
        if id(node) in targets:
            return True
        if id(node) not in seen:
            seen.add(id(node))
            todo += [n for n, _ in node.next_functions if n is not None]
    return False


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


def _failure(exc: BaseException, what: str, fn: Callable[[Any], Any]) -> Finding:
    """A step-failed finding at the innermost traceback frame outside torch and the doctor."""
    site, tb = def_site(fn), exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if user_file(filename):
            site = f"{short_path(filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    message = (str(exc).strip().splitlines() or [""])[0]
    return finding("step-failed", f"the {what} raised {type(exc).__name__}: {message}", site)

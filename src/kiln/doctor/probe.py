"""The doctor's probe: hooks and patches that watch a loop's steps and record what they see.

:class:`Probe` runs the steps (and the evaluation) of :func:`kiln.doctor.steps.check` with
torch's global module/optimizer hooks, a gradient hook per parameter and a few patched
``Tensor``, autograd, ``GradScaler`` and clipping functions in place, and records module modes,
grad mode, input devices, host syncs, gradients left from the last update, the first step's
autograd graph, clips under a loss scale, and data and step times. Everything comes off again
when the ``with`` block ends; :mod:`kiln.doctor.steps` turns the records into findings.
"""

from __future__ import annotations

import gc
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch
import torch.nn.utils.clip_grad as clip_module
import torch.optim.optimizer as optim_module
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from kiln.doctor.checks import model_device
from kiln.doctor.findings import Finding, finding
from kiln.doctor.sites import def_site, in_torch, short_path, user_file, user_site
from kiln.models.wrappers import wrapper_chain

__all__ = ["Probe"]

_MISSING = object()
_SYNCS = {"item": ".item()", "tolist": ".tolist()", "numpy": ".numpy()", "cpu": ".cpu()"}
_SYNCS["__float__"] = "float()"
_GRAPH_LIMIT = 20_000  # autograd nodes walked per graph: bounds the cost on huge models


class Probe:
    """Hooks and patches that watch the steps and record what they see."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model = model
        self.names = {id(m): (n or type(m).__name__) for n, m in model.named_modules()}
        self.roots = {id(m) for m in wrapper_chain(model)}  # DDP, DataParallel, compile
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
        # Where the model itself was last called: mode findings point here, at the call the
        # user can fix (model.train()/model.eval() before it), not inside their forward.
        self.call_site: str | None = None
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

    def __enter__(self) -> Probe:
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
        self.call_site = user_site()
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
            self.grad_eval_site = self.call_site

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
            self.mode_site.setdefault(self.phase, self.call_site or user_site())

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

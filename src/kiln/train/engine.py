"""The Engine: device, precision, gradient accumulation and the optimizer update, for any loop.

It is the part of the Trainer a user can take into their own loop. Nothing happens out of sight:
the loop still reads forward, loss, backward, update, schedule, in order.

Example:
    >>> import torch
    >>> from torch import nn
    >>> engine = Engine(precision="bf16", accumulate=2, clip_norm=1.0, device="cpu")
    >>> model, opt = engine.setup(nn.Linear(4, 2), None)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> batches = [(torch.randn(n, 4), torch.randint(0, 2, (n,))) for n in (8, 8, 5)]
    >>> for i, batch in enumerate(batches):
    ...     x, y = engine.to_device(batch)                     # notes the batch size (8, 8, 5)
    ...     with engine.micro_step(i, len(batches)) as update:  # no_sync unless updating
    ...         with engine.autocast():
    ...             loss = nn.functional.cross_entropy(model(x), y)
    ...         engine.backward(loss)                          # weighted by its share of samples
    ...     if update:
    ...         grad_norm = engine.optimizer_step(opt)         # unscale, clip, step, zero_grad
    >>> engine.updates
    2

Accumulation rules (DESIGN.md rule 4): micro-step ``i`` of ``n`` updates when ``(i + 1) % k == 0``
or it is the last one. The gradient of a group is the mean loss over all of its samples, exactly,
whatever the batch sizes (a short last batch, a partial last group): each micro-batch's loss is
weighted by its number of samples and the group's gradient is rescaled at the update by its true
total (:mod:`kiln.train.accumulation`). The size of a micro-batch is ``micro_step(size=...)``, or
else the leading dimension of the batch last moved by :meth:`Engine.to_device` with gradients
enabled. When the number of batches is unknown (``micro_step(i, None)``), call
:meth:`Engine.flush` after the loop: it applies the last partial group, whose gradients would
otherwise leak into the next epoch (starting one with such a group pending is an error).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, TypeVar

import torch
from torch import nn

from kiln.errors import NotSupportedError, UsageError
from kiln.train import accumulation, distributed, parallel
from kiln.train.accumulation import GroupWeights, MicroStep, leading_size
from kiln.train.found_inf import FoundInf
from kiln.train.precision import Precision

T = TypeVar("T")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but no CUDA GPU is available; use device=auto")
    return dev


class Engine:
    """Device placement, precision, accumulation, clipping and the optimizer update.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 uses a GradScaler; refused on CPU unless
            ``allow_fp16_cpu``).
        accumulate: micro-batches per optimizer update.
        clip_norm: clip the global grad norm to this value (after unscaling).
        clip_value: clamp each grad element to ``[-clip_value, clip_value]`` (after unscaling).
        compile: wrap the model in ``torch.compile``.
        channels_last: use channels-last memory format for 4-D inputs and the model.
        allow_fp16_cpu: see ``precision``.
        strategy: ``auto`` (ddp under torchrun with several processes, else single),
            ``single``, ``ddp``, ``fsdp`` or ``dp``; ddp/fsdp join (or create) the process group.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm under ddp/fsdp.
    """

    def __init__(
        self,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        accumulate: int = 1,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        compile: bool = False,
        channels_last: bool = False,
        allow_fp16_cpu: bool = False,
        strategy: str = "auto",
        sync_batchnorm: bool = False,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1 micro-batches per update, got {accumulate}")
        for name, v in (("clip_norm", clip_norm), ("clip_value", clip_value)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or None to disable), got {v}")
        self.world = distributed.World.from_env()
        self.strategy = distributed.resolve_strategy(strategy, self.world)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        if self.device.type == "cuda" and self.world.size > 1 and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.strategy in ("ddp", "fsdp"):
            self.owns_group = distributed.init_process_group(self.device, self.world)
        self.sync_batchnorm = sync_batchnorm
        self.precision = Precision(precision, self.device, allow_fp16_cpu=allow_fp16_cpu)
        self.accumulate = accumulate
        self.clip_norm = clip_norm
        self.clip_value = clip_value
        self.compile = compile
        self.channels_last = channels_last
        self.updates = 0  # optimizer updates taken (skipped fp16 steps excluded)
        self.skipped = 0  # updates the GradScaler skipped for non-finite grads
        self.model: nn.Module | None = None  # the unwrapped model: what checkpoints save
        self._wrapped: nn.Module | None = None
        self._scale = 1.0
        self._last_stepped = True
        self._non_blocking = self.device.type == "cuda"
        self._cpu_as_is = self.device.type == "cpu" and not channels_last
        self._micro = MicroStep()
        self._group = GroupWeights(accumulate)
        self._seen: int | None = None  # leading size of the batch to_device moved last
        self._last_i = -1
        self._fsdp = False
        self._found_inf = FoundInf(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()

    # ------------------------------------------------------------------ setup

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Move ``model`` to the device and wrap it (compile) in this one place.

        Build the optimizer from the returned model's parameters when you pass None here.
        Returns the model to call in the loop and the optimizer.
        """
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        wrapped = parallel.wrap(
            model,
            strategy=self.strategy,
            device=self.device,
            precision=self.precision.kind,
            sync_batchnorm=self.sync_batchnorm,
        )
        self._fsdp = self.strategy == "fsdp"
        if self.compile:  # compile the DDP/FSDP wrapper too, so its hooks stay in the graph
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        self._wrapped = wrapped
        return wrapped, optimizer

    def to_device(self, batch: T) -> T:
        """Move a tensor or a (nested) tuple/list/dict of tensors to the device.

        With gradients enabled, the batch's leading dimension is noted as the size of the next
        micro-step (its share of the accumulation group); evaluation under ``no_grad`` is not.
        """
        if torch.is_grad_enabled():
            self._seen = leading_size(batch)
        if self._cpu_as_is:  # CPU tensors stay as they are: skip the per-step traversal
            return batch
        return self._move(batch)

    def _move(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if self.channels_last and obj.dim() == 4 and obj.is_floating_point():
                return obj.to(
                    self.device, non_blocking=self._non_blocking, memory_format=torch.channels_last
                )
            return obj.to(self.device, non_blocking=self._non_blocking)
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._move(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._move(v) for k, v in obj.items()}
        return obj

    # ------------------------------------------------------------------ the step

    def is_update(self, i: int, n_batches: int | None) -> bool:
        """Whether micro-step ``i`` (0-based, of ``n_batches``) ends an accumulation group."""
        return accumulation.ends_group(i, n_batches, self.accumulate)

    def starts_group(self, i: int) -> bool:
        """Whether micro-step ``i`` is the first of its accumulation group."""
        return accumulation.starts_group(i, self.accumulate)

    def group_size(self, i: int, n_batches: int | None) -> int:
        """Micro-batches in the accumulation group of micro-step ``i`` (smaller when partial)."""
        return accumulation.group_length(i, n_batches, self.accumulate)

    def updates_per_pass(self, n_batches: int) -> int:
        """Optimizer updates a pass over ``n_batches`` micro-batches takes (partial group too)."""
        return accumulation.updates_per_pass(n_batches, self.accumulate)

    def micro_step(
        self,
        i: int,
        n_batches: int | None,
        *,
        weight: float | None = None,
        update: bool | None = None,
        size: int | None = None,
        last_piece: bool = True,
    ) -> MicroStep:
        """Context for one micro-batch; ``as`` gives whether this micro-step updates the weights.

        On non-update micro-steps of a model that has ``no_sync`` (DDP), gradient all-reduce is
        skipped, so there is one all-reduce per update.

        Args:
            i: index of the micro-batch in this pass over the data (0 starts a new pass).
            n_batches: micro-batches in the pass, or None when unknown (then call :meth:`flush`
                after the loop).
            weight: the caller's own loss factor for every micro-batch of the group, instead
                of the exact default (samples in it / samples in the group).
            update: override the Engine's update decision (prefer ``last_piece``: the rule
                then stays the Engine's).
            size: samples in this micro-batch (default: the leading dimension of the batch last
                moved by :meth:`to_device`; when neither is known, all count the same).
            last_piece: False for every piece of loader batch ``i`` split into several
                micro-batches (they share ``i``) but the last: only the last piece may update.

        Raises:
            UsageError: ``i`` starts a new pass while the previous pass's last group still holds
                gradients that no update applied.
        """
        if update is None:
            update = last_piece and accumulation.ends_group(i, n_batches, self.accumulate)
        if i < self._last_i:  # a new pass (the pieces of one split batch share their i)
            self._check_no_pending(i)
        self._last_i = i
        if size is None:
            size, self._seen = self._seen, None
        n, k = n_batches, self.accumulate
        planned = accumulation.group_length(i, n, k) if n is not None else 0
        self._scale = self._group.factor(size, update=update, weight=weight, planned=planned)
        step = self._micro
        step.update = update
        if self._fsdp:
            if self.accumulate > 1:  # FSDP2: reduce-scatter gradients only on update steps
                self.model.set_requires_gradient_sync(update)  # type: ignore[union-attr,operator]
            step.sync = None
        else:
            step.sync = None if update else getattr(self._wrapped, "no_sync", None)
        return step

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for forward and loss (a no-op in fp32). Keep backward outside it."""
        return self.precision.autocast()

    def _check_no_pending(self, i: int) -> None:
        if not self._group.steps:
            return
        model = self.model
        if model is not None and all(p.grad is None for p in model.parameters()):
            self._group.reset()  # the caller dropped the gradients (zero_grad) on purpose
            return
        raise UsageError(
            f"micro_step({i}, ...) starts a new pass over the data while the last "
            f"{self._group.steps} micro-batches of the previous one were never applied: their "
            "gradients would leak into this pass. With an unknown number of batches "
            "(micro_step(i, None)) call engine.flush(optimizer) after the loop, or "
            "engine.zero_grad(optimizer) to drop them"
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` times this micro-step's accumulation factor (and loss scale)."""
        if self._scale != 1.0:
            loss = loss * self._scale
        self.precision.backward(loss)
        self._group.backward()

    @property
    def pending(self) -> int:
        """Micro-batches back-propagated since the last update (0: no pending gradients)."""
        return self._group.steps

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients (set to None) and the pending accumulation group with them."""
        optimizer.zero_grad(set_to_none=True)
        self._group.reset()

    def flush(self, optimizer: torch.optim.Optimizer, *, grad_norm: bool = False) -> bool:
        """Apply a pending partial group: the end of a loop over an unknown number of batches.

        Its micro-steps ran without an update (and, under DDP, without the all-reduce), so the
        gradients are averaged over the processes here, then stepped like any other group.
        Returns whether there was a group to apply.

        Example:
            >>> from torch import nn
            >>> engine = Engine(device="cpu", accumulate=4)
            >>> model, _ = engine.setup(nn.Linear(2, 1))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> for i in range(6):  # a stream of unknown length: 4 + 2 micro-batches
            ...     with engine.micro_step(i, None) as update:
            ...         engine.backward(model(torch.randn(3, 2)).sum())
            ...     if update:
            ...         _ = engine.optimizer_step(opt)
            >>> engine.flush(opt), engine.updates
            (True, 2)
        """
        if not self._group.steps:
            return False
        if self.world.size > 1:
            if self._fsdp:
                raise NotSupportedError(
                    "engine.flush under strategy=fsdp: FSDP keeps unsynchronised gradients out of "
                    "reach; pass the number of batches to micro_step so the last one updates"
                )
            if getattr(self._wrapped, "no_sync", None) is not None:  # DDP skipped the all-reduce
                world = float(self.world.size)
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            distributed.all_reduce_sum(p.grad).div_(world)
        self.optimizer_step(optimizer, grad_norm=grad_norm)
        return True

    def _correct_group(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale the group's gradients from its guessed total of samples to its true one."""
        group = self._group
        if group.explicit or not group.steps:
            return
        if self.world.size == 1:
            factor = group.correction()
            if factor == 1.0:  # the common case (full groups of equal batches): nothing to do
                return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        if self.world.size == 1:
            torch._foreach_mul_(grads, factor)
            return
        # Every replica must apply the same factor: the ranks' totals are summed (one small
        # all-reduce, no host sync), so the factor is the one of the global batch.
        totals = torch.tensor(
            [group.expected, group.samples], dtype=torch.float64, device=self.device
        )
        totals = distributed.all_reduce_sum(totals)
        torch._foreach_mul_(grads, (totals[0] / totals[1]).float())

    def grad_norm(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Total L2 norm of the current gradients (a device tensor; no host sync).

        Under fp16 the gradients are still scaled here; non-finite values stay non-finite.
        """
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor over the shards
        return full() if full is not None else norm

    def grads_finite(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None = None
    ) -> bool:
        """Whether every gradient (and ``loss``, if given) is free of NaN/Inf: one host sync.

        Uses the GradScaler's fused check (one kernel per dtype over all gradients, into a flag
        tensor kept between calls), falling back to the total norm for tensors it does not take
        (FSDP2's DTensors). A NaN/Inf loss makes the gradients non-finite too, so the loss only
        needs checking under fp16, where the gradients are scaled and the GradScaler skips
        overflowing updates itself. :meth:`optimizer_step` with ``skip_nonfinite=True`` makes
        the same decision without the host sync.
        """
        if self.precision.kind == "fp16":  # scaled grads: the scaler checks them at its step
            if loss is None:
                return True
            lossbad = (~torch.isfinite(loss.detach()).all()).float()
            if self.world.size > 1:
                lossbad = distributed.all_reduce_max(lossbad)
            return not bool(lossbad)
        bad = self._found_inf.check(optimizer, loss)
        if self.world.size > 1:
            bad = distributed.all_reduce_max(bad.clone())
        return not self._found_inf.read(bad)

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        grad_norm: bool = False,
        skip_nonfinite: bool = False,
    ) -> torch.Tensor | None:
        """Unscale, clip, step, update the scaler, and zero the grads (set to None).

        Returns the total grad norm (a device tensor, no host sync) when clipping by norm or when
        ``grad_norm`` is True, else None. ``self.updates`` counts updates taken.

        Args:
            optimizer: the optimizer to step.
            grad_norm: return the total gradient norm even without clipping.
            skip_nonfinite: skip the update when a gradient holds NaN/Inf, without a host sync
                where the optimizer allows it (``fused=True``: the flag goes into the fused
                kernel, as the GradScaler does; see :mod:`kiln.train.found_inf`). Such a step
                still counts in ``self.updates``; :meth:`nonfinite_skips` reads how many were
                skipped (one sync; call it at a log interval). Under fp16 the GradScaler already
                skips these steps (``self.skipped``).

        Example:
            >>> from torch import nn
            >>> engine = Engine(device="cpu")
            >>> model, _ = engine.setup(nn.Linear(2, 1))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
            >>> for scale in (1.0, float("nan"), 1.0):
            ...     with engine.micro_step(0, 1):
            ...         engine.backward(model(torch.ones(4, 2)).sum() * scale)
            ...     _ = engine.optimizer_step(opt, skip_nonfinite=True)
            >>> engine.nonfinite_skips()
            1
        """
        self._correct_group(optimizer)  # before unscaling: the factor is linear
        guard = skip_nonfinite and self.precision.scaler is None
        flag: torch.Tensor | None = None
        if guard:  # on the grads as back-propagated: clipping a NaN norm would spread it
            flag = self._found_inf.check(optimizer)
            if self.world.size > 1:  # every replica skips alike (an all-reduce, no host sync)
                flag = distributed.all_reduce_max(flag.clone())
        norm: torch.Tensor | None = None
        if self.clip_norm is not None or self.clip_value is not None or grad_norm:
            self.precision.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if self.clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, self.clip_value, foreach=True)
            if self.clip_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
            elif grad_norm:
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params],
                    foreach=True,
                )
        if flag is not None:
            self._found_inf.step(optimizer, flag)
            stepped = True
        else:
            stepped = self.precision.step(optimizer)
        self.zero_grad(optimizer)
        if stepped:
            self.updates += 1
        else:
            self.skipped += 1
        self._last_stepped = stepped
        return norm

    def nonfinite_skips(self) -> int:
        """Updates ``optimizer_step(skip_nonfinite=True)`` skipped so far (one host sync)."""
        return self._found_inf.skipped()

    @property
    def last_step_taken(self) -> bool:
        """False when the fp16 GradScaler skipped the last update (non-finite grads)."""
        return self._last_stepped

    def close(self) -> None:
        """Drop the wrapper (DDP's reducer holds the process group), then end a group we created.

        The order matters: destroying the group while a DDP reducer still references it makes
        gloo's destructor wait on peers that have already left.
        """
        self._wrapped = None
        gc.collect()
        if self.owns_group:
            distributed.barrier()
            distributed.destroy()
            self.owns_group = False

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.state_dict(),
            "updates": self.updates,
            "skipped": self.skipped,
            "accumulation": self._group.state_dict(),
            "found_inf": self._found_inf.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.precision.load_state_dict(state["precision"])
        self.updates = int(state["updates"])
        self.skipped = int(state.get("skipped", 0))
        self._group.load_state_dict(state.get("accumulation", {}))
        self._found_inf.load_state_dict(state.get("found_inf", {}))
        self._seen, self._last_i = None, -1

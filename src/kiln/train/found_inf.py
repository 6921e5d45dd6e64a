"""Non-finite gradients found on the device, and an optimizer step that skips itself on them.

:meth:`FoundInf.check` writes one flag (a 0-dim float tensor on the device: 0 finite, >0 not)
with the GradScaler's fused kernel, one launch per dtype over all gradients. Reading it
(``bool(flag)``) is a host sync: on a GPU the CPU waits for the whole backward pass.

:meth:`FoundInf.step` avoids that read the way ``torch.amp.GradScaler`` does: a fused optimizer
(``fused=True``: SGD, Adam, AdamW, Adagrad) takes the flag as ``found_inf`` and skips its own
update inside the kernel when it is set, so parameters and optimizer state stay exactly as they
were. The flags are summed into a device counter that the caller reads when it wants to (at its
log interval). Where the optimizer cannot take the flag (foreach or for-loop implementations,
DTensor gradients, or a parameter without optimizer state yet, whose state a skipped fused step
would leave uninitialised), the flag is read on the host instead: one sync, same result.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.SGD([p], lr=0.1, fused=True)
    >>> guard = FoundInf(torch.device("cpu"))
    >>> p.grad = torch.ones(3)
    >>> guard.step(opt, guard.check(opt))            # finite: steps
    >>> p.grad = torch.full((3,), float("nan"))
    >>> guard.step(opt, guard.check(opt))            # NaN: skipped inside the fused kernel
    >>> [round(v, 4) for v in p.tolist()], guard.skipped()
    ([0.9, 0.9, 0.9], 1)
"""

from __future__ import annotations

import torch

__all__ = ["FoundInf"]


class FoundInf:
    """The found-inf flag of an optimizer's gradients and a device-side count of skipped steps.

    Args:
        device: where the flags and the counter live (the gradients' device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._flag = torch.zeros((), device=device)
        self._one = torch.ones((), device=device)
        self._count = torch.zeros((), device=device)
        self._host_skips = 0
        self._dirty = True  # whether the flag may hold a 1 (unknown until read on the host)
        self._plan: tuple[int, int, list[list[torch.Tensor]], bool] | None = None

    def _groups(self, optimizer: torch.optim.Optimizer) -> tuple[list[list[torch.Tensor]], bool]:
        """The optimizer's parameters by dtype, and whether all are plain tensors (cached)."""
        groups = optimizer.param_groups
        size = sum(len(g["params"]) for g in groups)
        plan = self._plan
        if plan is None or plan[0] != id(optimizer) or plan[1] != size:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            plain = True
            for g in groups:
                for p in g["params"]:
                    by_dtype.setdefault(p.dtype, []).append(p)
                    plain = plain and type(p.data) is torch.Tensor
            plan = (id(optimizer), size, list(by_dtype.values()), plain)
            self._plan = plan
        return plan[2], plan[3]

    def check(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The flag of the current gradients (and ``loss``): a device tensor, no host sync.

        The flag tensor is reused: the next call overwrites it.
        """
        flag = self._flag
        if self._dirty:  # the last read was clean: no zeroing op (the kernel only sets it)
            flag.zero_()
        self._dirty = True
        if loss is not None:
            flag.add_(~torch.isfinite(loss.detach()).all())
        by_dtype, plain = self._groups(optimizer)
        if plain:
            for params in by_dtype:
                grads = [p.grad for p in params if p.grad is not None]
                if grads:  # scale 1: the grads are left as they are
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, self._one)
        else:  # DTensor (FSDP2) gradients: the total norm is non-finite exactly when one is
            grads = [p.grad for params in by_dtype for p in params if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
                full = getattr(norm, "full_tensor", None)
                flag.add_(~torch.isfinite(full() if full is not None else norm))
        return flag

    def read(self, flag: torch.Tensor) -> bool:
        """``bool(flag)`` for the flag of :meth:`check` (or its all-reduced copy): one host sync.

        A clean flag is remembered, so the next :meth:`check` need not zero it.
        """
        bad = bool(flag)
        if flag is self._flag or not bad:
            self._dirty = bad
        return bad

    def can_skip_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` skips its own step on a device flag (fused, state in place)."""
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            return False
        if not all(g.get("fused") for g in optimizer.param_groups):
            return False
        _, plain = self._groups(optimizer)
        if not plain:
            return False
        # A skipped first fused step would leave lazily created state (SGD's momentum buffer
        # is torch.empty_like) uninitialised: the first step of each parameter is read on the
        # host. Plain SGD keeps no state at all.
        if len(optimizer.state) >= self._plan[1]:  # type: ignore[index]
            return True
        return type(optimizer) is torch.optim.SGD and all(
            g["momentum"] == 0 for g in optimizer.param_groups
        )

    def step(self, optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
        """``optimizer.step()`` unless ``flag`` is set; counted, read on the host only if needed."""
        if self.can_skip_on_device(optimizer):
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = flag  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
            self._count.add_(flag.clamp(max=1))
        elif bool(flag):  # one host sync: this optimizer cannot take the flag
            self._host_skips += 1
        else:
            optimizer.step()

    def skipped(self) -> int:
        """Steps skipped for non-finite gradients so far (reads the device counter: one sync)."""
        return int(self._count.item()) + self._host_skips

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._count.zero_()
        self._host_skips = int(state.get("skipped", 0))

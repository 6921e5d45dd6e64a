"""Precision as one small object: autocast, loss scaling, unscale-before-clip, optimizer step.

``fp32`` does nothing; ``bf16`` autocasts and needs no scaler (bf16 has fp32's exponent range);
``fp16`` autocasts and scales the loss with ``torch.amp.GradScaler`` so small gradients do not
flush to zero. On CPU, fp16 is refused unless forced: this CPU class has no native fp16 matmul
and a train step measured ~100x slower than fp32, while bf16 is ~2x faster.

Example:
    >>> import torch
    >>> p = Precision("bf16", torch.device("cpu"))
    >>> with p.autocast():
    ...     y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: fp32 makes no context object per step


class Precision:
    """Autocast + optional GradScaler for one device.

    Args:
        kind: ``fp32``, ``bf16`` or ``fp16``.
        device: where the model runs.
        allow_fp16_cpu: run fp16 on CPU anyway (a warning says the cost).
    """

    def __init__(self, kind: str, device: torch.device, *, allow_fp16_cpu: bool = False) -> None:
        if kind not in _DTYPES:
            raise ValueError(f"unknown precision {kind!r}; allowed: {', '.join(_DTYPES)}")
        if kind == "fp16" and device.type == "cpu":
            why = (
                "fp16 autocast on CPU is ~100x slower than fp32 here (no native fp16 matmul); "
                "use precision=bf16 (about 2x faster than fp32 on AVX-512/AMX CPUs)"
            )
            if not allow_fp16_cpu:
                raise ValueError(
                    f"precision=fp16 refused on CPU: {why}; or set allow_fp16_cpu=true"
                )
            warnings.warn(f"running fp16 on CPU: {why}", RuntimeWarning, stacklevel=2)
        self.kind = kind
        self.device = device
        self.dtype = _DTYPES[kind]
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device.type) if kind == "fp16" else None
        )

    @property
    def enabled(self) -> bool:
        return self.kind != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for forward + loss (a no-op for fp32)."""
        if self.kind == "fp32":
            return _NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled first when a GradScaler is active."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide grads by the loss scale in place, so clipping sees true gradient values."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Optimizer step (skipped by the scaler on inf/NaN grads). Returns True if it stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scaler lowers its scale exactly when it skipped the step for non-finite grads.
        return self.scaler.get_scale() >= scale

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

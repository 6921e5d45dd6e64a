"""Shared checks and helpers of the loss functions (messages say what was expected)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kiln.config import LossConfig

LossFn = Callable[..., torch.Tensor]
#: A :data:`LOSSES` entry: ``factory(cfg, task, class_counts)`` -> :data:`LossFn`.
LossFactory = Callable[[LossConfig, str, "torch.Tensor | None"], LossFn]

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
    torch.int64: "long",
    torch.int32: "int",
    torch.bool: "bool",
}


def _desc(t: torch.Tensor) -> str:
    """``float [8, 10]``: a tensor's dtype and shape for error messages."""
    return f"{_DTYPES.get(t.dtype, str(t.dtype).removeprefix('torch.'))} {list(t.shape)}"


def _check_reduction(what: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits (autocast) lose too much in log_softmax; float64 stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# The (dtype, shape) signatures that passed _check_class_targets: the check depends on nothing
# else, so a training loop, whose batches keep one signature, pays one set lookup per step.
_PASSED: set[tuple[object, ...]] = set()


def _check_class_targets(
    what: str, logits: torch.Tensor, target: torch.Tensor, *, soft_ok: bool, dims: tuple[int, ...]
) -> None:
    """Logits ``[N, C]`` (``[B, T, V]``) and class indices ``[N]`` or probabilities ``[N, C]``."""
    key = (logits.dtype, logits.shape, target.dtype, target.shape, soft_ok, dims)
    if key in _PASSED:
        return
    _check_signature(what, logits, target, soft_ok=soft_ok, dims=dims)
    if len(_PASSED) >= 256:  # many shapes (variable-length batches): keep the set small
        _PASSED.clear()
    _PASSED.add(key)


def _check_signature(
    what: str, logits: torch.Tensor, target: torch.Tensor, *, soft_ok: bool, dims: tuple[int, ...]
) -> None:
    if not logits.is_floating_point() or logits.dim() not in dims:
        shapes = " or ".join({2: "[N, C]", 3: "[B, T, V] (a language model)"}[d] for d in dims)
        raise ValueError(f"{what}: logits must be floating {shapes}, got {_desc(logits)}")
    lead = list(logits.shape[:-1])
    indices = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    if indices and list(target.shape) == lead:
        return
    if soft_ok and target.is_floating_point() and target.shape == logits.shape:
        return
    expected = f"class indices of shape {lead}"
    if soft_ok:
        expected += f" or probabilities of shape {list(logits.shape)}"
    if target.is_floating_point() and target.shape == logits.shape:
        hint = "; pass label_smoothing instead of one-hot targets?"
        hint += " (mixup/cutmix soft targets: use cross_entropy or weighted_cross_entropy)"
    elif list(target.shape) == [*lead, 1]:
        hint = "; squeeze the last dimension (targets.squeeze(-1))"
    elif target.is_floating_point() and list(target.shape) == lead:
        hint = "; convert class labels with targets.long()"
    else:
        hint = f" for logits {list(logits.shape)}; check that outputs and targets match"
    raise ValueError(f"{what}: targets must be {expected}, got {_desc(target)}{hint}")


def _flatten(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked logits as ``[M, C]`` and targets as indices ``[M]`` or probabilities ``[M, C]``."""
    c = logits.shape[-1]
    flat = _upcast(logits).reshape(-1, c)
    if target.is_floating_point():
        return flat, target.reshape(-1, c).to(flat.dtype)
    return flat, target.reshape(-1).long()


def _check_classes_on_cpu(what: str, target: torch.Tensor, c: int) -> None:
    # A range check is free on the CPU; on an accelerator it would stall the loop on a sync.
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= c):
        raise ValueError(
            f"{what}: class indices must be in [0, {c - 1}] for {c} classes, got values in "
            f"[{int(target.min())}, {int(target.max())}]; the model's output size must be the "
            f"number of classes"
        )


def _as_weight(what: str, weight: torch.Tensor | Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(weight, dtype=torch.float32).detach()
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"{what}: class weights must be a 1-D list, one per class, got {w.shape}")
    # Value checks only where they are free: a device tensor would cost a sync per call.
    if w.device.type == "cpu" and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"{what}: class weights must be finite and >= 0, got {w.tolist()}")
    return w


def _weight_for(
    what: str, weight: torch.Tensor | None, logits: torch.Tensor
) -> torch.Tensor | None:
    if weight is None:
        return None
    if weight.numel() != logits.shape[-1]:
        raise ValueError(
            f"{what}: {weight.numel()} class weights for logits with {logits.shape[-1]} "
            f"classes; give one weight per class (or class_weights=auto)"
        )
    return weight.to(device=logits.device, dtype=logits.dtype)

"""Size, latency and accuracy of a compressed model, as ratios to the fp32 model.

All compression methods report through this module so their tables compare like with like:
latency is the median of timed forward passes under ``torch.inference_mode`` after warm-up, at
batch 1 and batch 64; size is the bytes of the saved file(s); accuracy or loss comes from one
pass over the test split.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(4, 2).eval()
    >>> x = torch.randn(64, 4)
    >>> ms = latency_ms(net, x[:1], reps=5, warmup=1)
    >>> ms > 0
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CompressedModel",
    "Row",
    "file_size",
    "latency_ms",
    "measure",
    "score",
    "table",
]

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CompressedModel:
    """What every compression method returns.

    Attributes:
        method: e.g. ``dynamic``, ``static``, ``qat``, ``pt2e``, ``onnx-int8``, ``prune``, ``fuse``.
        predict: batch (CPU tensor) -> outputs (CPU tensor), the way the model is meant to run.
        module: the ``nn.Module`` when there is one (None for an ONNX Runtime session).
        files: the saved file(s), once :attr:`save` ran.
        save: writes the model into a folder and returns the main file.
        notes: what the method did (fused patterns, sparsity per layer, warnings to show).
    """

    method: str
    predict: Predict
    save: Callable[[Path], Path]
    module: torch.nn.Module | None = None
    files: list[Path] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the comparison table."""

    name: str
    size_bytes: int
    latency_b1_ms: float
    latency_b64_ms: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_size(paths: Path | Sequence[Path]) -> int:
    """Total bytes of a file, a folder (recursively) or several of them."""
    items = [paths] if isinstance(paths, Path) else list(paths)
    total = 0
    for p in items:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total


def latency_ms(predict: Predict, x: torch.Tensor, *, reps: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``predict(x)`` over ``reps`` timed calls after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            predict(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            predict(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def score(predict: Predict, loader: Iterable[Any], task: str) -> dict[str, float]:
    """Accuracy and cross-entropy (classification) or MSE (regression) over ``loader``."""
    n, correct, loss = 0, 0, 0.0
    with torch.inference_mode():
        for x, y in loader:
            out = predict(x).float()
            if task == "classification":
                loss += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(-1) == y).sum())
            else:
                loss += float(F.mse_loss(out.reshape(y.shape), y.float(), reduction="sum"))
            n += len(y)
    if n == 0:
        raise ValueError("the evaluation loader is empty")
    if task == "classification":
        return {"acc": correct / n, "loss": loss / n}
    return {"mse": loss / n}


def measure(
    name: str,
    predict: Predict,
    files: Path | Sequence[Path],
    loader: Iterable[Any],
    example: torch.Tensor,
    *,
    task: str,
    reps: int = 30,
) -> Row:
    """A table row: size of ``files``, latency at batch 1 and 64 (from ``example``), metrics."""
    big = example[:64]
    if len(big) < 64:  # repeat rows up to a batch of 64
        big = example.repeat((64 + len(example) - 1) // len(example), *[1] * (example.dim() - 1))
        big = big[:64]
    return Row(
        name=name,
        size_bytes=file_size(files),
        latency_b1_ms=latency_ms(predict, example[:1], reps=reps),
        latency_b64_ms=latency_ms(predict, big, reps=reps),
        metrics=score(predict, loader, task),
    )


def table(rows: Sequence[Row], baseline: str = "fp32") -> str:
    """A markdown table with each row's ratios to the ``baseline`` row."""
    base = next((r for r in rows if r.name == baseline), rows[0])
    keys = list(base.metrics)
    head = ["model", "size MB", "size x", "b1 ms", "b1 speed-up", "b64 ms", "b64 speed-up"]
    head += [f"{k}" for k in keys] + [f"{k} vs {base.name}" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.name,
            f"{r.size_bytes / 1e6:.3f}",
            f"{base.size_bytes / max(r.size_bytes, 1):.2f}",
            f"{r.latency_b1_ms:.3f}",
            f"{base.latency_b1_ms / r.latency_b1_ms:.2f}",
            f"{r.latency_b64_ms:.3f}",
            f"{base.latency_b64_ms / r.latency_b64_ms:.2f}",
        ]
        cells += [f"{r.metrics.get(k, float('nan')):.4f}" for k in keys]
        cells += [f"{r.metrics.get(k, float('nan')) - base.metrics[k]:+.4f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

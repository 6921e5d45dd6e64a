"""``kiln env``: the facts a bug report needs.

Torch and the package metadata are read inside the functions, so ``kiln --help`` stays fast.

Example:
    >>> print_env()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import sys

import typer

__all__ = ["collect", "command", "print_env", "register"]


def command() -> None:
    """Versions, threads and devices: what a bug report needs."""
    print_env()


def register(app: typer.Typer) -> None:
    """Add ``kiln env`` to ``app``."""
    app.command("env")(command)


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    import torch

    info = {
        "kiln": _version("kiln"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for pkg in (
        "numpy",
        "pydantic",
        "torchmetrics",
        "safetensors",
        "scikit-learn",
        "tensorboard",
        "onnx",
        "onnxruntime",
        "torchao",
        "transformers",
    ):
        info[pkg] = _version(pkg)
    info["cpu capability"] = torch.backends.cpu.get_cpu_capability()
    info["cpu cores"] = str(os.cpu_count())
    info["torch threads"] = (
        f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )
    info["bf16 on cpu (mkldnn)"] = str(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    info["cuda"] = (
        f"{torch.version.cuda}, {torch.cuda.device_count()} device(s): "
        + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "not available"
    )
    info["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "-"
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = "available" if mps is not None and mps.is_available() else "not available"
    info["distributed"] = (
        ", ".join(
            b
            for b, ok in (
                ("gloo", torch.distributed.is_gloo_available()),
                ("nccl", torch.distributed.is_nccl_available()),
            )
            if ok
        )
        or "none"
    )
    for var in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MALLOC_MMAP_THRESHOLD_"):
        if var in os.environ:
            info[f"${var}"] = os.environ[var]
    return info


def print_env() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")

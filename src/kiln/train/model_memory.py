"""Refuse a model whose parameters cannot fit in memory, before it is built or a run exists.

``model.kwargs.width=200000`` is a valid config that asks for a terabyte of weights: building it
would swap the machine to a halt or be killed by the OOM killer, after the run directory was
made. The model is first built on PyTorch's ``meta`` device (shapes only, no storage: a
millisecond even for a huge model), its parameters and buffers are counted, and the config is
refused with one line when they exceed the memory available now.

Example:
    >>> from kiln.config import ModelConfig
    >>> from kiln.data.base import DataInfo
    >>> info = DataInfo(task="classification", input_shape=(64,), num_classes=10)
    >>> parameter_bytes(ModelConfig(name="mlp", kwargs={"hidden": [32]}), info)
    9640
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.errors import ModelError

__all__ = ["available_bytes", "check_model_fits", "parameter_bytes"]


def available_bytes() -> int:
    """Memory the system can give this process now (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def parameter_bytes(model_cfg: Any, info: Any) -> int | None:
    """Bytes of the parameters and buffers ``model_cfg`` builds, or None when unknown.

    Only registry models are probed: a user's class (``model.target``) may do anything in its
    constructor (download, open files), which must not run twice.
    """
    if getattr(model_cfg, "target", None) is not None:
        return None
    from kiln.registry import build_model

    try:
        with torch.device("meta"):
            probe = build_model(model_cfg, info)
    # A builder that cannot run on the meta device (or a config it refuses) says nothing about
    # memory: the real build that follows raises the real error.
    except Exception:
        return None
    tensors = [*probe.parameters(), *probe.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_fits(model_cfg: Any, info: Any) -> None:
    """Raise :class:`~kiln.errors.ModelError` when the model's weights exceed available memory.

    Training needs about four times the weights (gradients and two Adam moments), so a model
    refused here could never train; one that passes may still need a smaller size to train.
    """
    need = parameter_bytes(model_cfg, info)
    if need is None:
        return
    have = available_bytes()
    if need > have:
        raise ModelError(
            f"model {model_cfg.name!r} with kwargs {_kwargs_text(model_cfg.kwargs)} has "
            f"{_gib(need)} of parameters, more than the {_gib(have)} of memory available "
            "(training needs about 4x that); make the model smaller"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    from kiln.errors import short_repr

    return short_repr(kwargs, 120)

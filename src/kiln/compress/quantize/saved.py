"""The file a ``torch.ao`` quantized model is saved as: one ``model.safetensors``, no pickle.

The converted model's state goes in with each int8 tensor stored as its integer values plus
scale/zero point (:func:`save_quantized`), and in the file's metadata the recipe (method, mode,
backend, example shape, format version) and the layout that says how to decode each entry.
Dynamic LSTM/GRU weights, which are packed script objects in ``state_dict()``, are stored as
plain tensors and packed again on load (:func:`load_state`). The rebuilding itself (same
deterministic prepare/convert on the fp32 model) is :func:`kiln.compress.quantize.ao.rebuild`;
:func:`kiln.compress.quantize.core.load_quantized` puts the two together.

Example:
    >>> import torch
    >>> from torch import nn
    >>> q = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 2)))  # doctest: +SKIP
    >>> save_quantized(q, Path("out"), {"method": "dynamic"}, None).name          # doctest: +SKIP
    'model.safetensors'
    >>> read_recipe("out")[1]["kiln_quant"]                                        # doctest: +SKIP
    '{"method": "dynamic", "format": 1}'
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "WEIGHTS",
    "decode_state",
    "load_state",
    "quantized_state",
    "read_recipe",
    "save_quantized",
]

WEIGHTS = "model.safetensors"
FORMAT = 1


def _encode(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Store ``value`` under ``key`` in ``tensors``; return how to decode it (JSON-ready)."""
    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            tensors[key] = value.detach().contiguous()
            return {"t": "tensor"}
        tensors[key] = value.int_repr().contiguous()
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            # Python floats survive JSON exactly (repr round-trips).
            return {"t": "qtensor", "scale": value.q_scale(), "zero_point": value.q_zero_point()}
        tensors[f"{key}#scales"] = value.q_per_channel_scales().contiguous()
        tensors[f"{key}#zero_points"] = value.q_per_channel_zero_points().contiguous()
        return {"t": "qchannel", "axis": value.q_per_channel_axis()}
    if value is None:
        return {"t": "none"}
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "value": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        items = [_encode(f"{key}#{i}", v, tensors) for i, v in enumerate(value)]
        return {"t": "tuple", "items": items}
    raise TypeError(f"cannot store state entry {key!r} of type {type(value).__name__}")


def _decode(key: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    kind = spec["t"]
    if kind == "tensor":
        return tensors[key]
    if kind == "qtensor":
        return torch._make_per_tensor_quantized_tensor(
            tensors[key], spec["scale"], spec["zero_point"]
        )
    if kind == "qchannel":
        return torch._make_per_channel_quantized_tensor(
            tensors[key], tensors[f"{key}#scales"], tensors[f"{key}#zero_points"], spec["axis"]
        )
    if kind == "none":
        return None
    if kind == "dtype":
        return getattr(torch, spec["value"])
    if kind == "tuple":
        return tuple(_decode(f"{key}#{i}", s, tensors) for i, s in enumerate(spec["items"]))
    raise ValueError(f"unknown entry kind {kind!r} in the saved layout of {key!r}")


def _rnn_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase

    return {name: m for name, m in model.named_modules() if isinstance(m, RNNBase)}


def quantized_state(model: nn.Module) -> dict[str, Any]:
    """The converted model's state, with dynamic LSTM/GRU weights as plain int8 tensors.

    Their packed weights are script objects in ``state_dict()``; ``_weight_bias()`` gives
    the same values as tensors, and ``set_weight_bias`` packs them again on load.
    """
    state: dict[str, Any] = dict(model.state_dict())
    for name, rnn in _rnn_modules(model).items():
        for key in [k for k in state if k.startswith(f"{name}._all_weight_values.")]:
            del state[key]
        wb = rnn._weight_bias()  # type: ignore[operator]
        for param, value in {**wb["weight"], **wb["bias"]}.items():
            state[f"{name}#rnn.{param}"] = value
    return state


def save_quantized(
    model: nn.Module, folder: Path, recipe: dict[str, Any], metadata: dict[str, str] | None
) -> Path:
    """Write ``folder/model.safetensors`` (state + recipe + ``metadata``); returns the file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layout = {k: _encode(k, v, tensors) for k, v in quantized_state(model).items()}
    meta = dict(metadata or {})
    meta["kiln_quant"] = json.dumps({**recipe, "format": FORMAT})
    meta["kiln_quant_layout"] = json.dumps(layout)
    path = folder / WEIGHTS
    tmp = path.with_name(f".{path.name}.tmp")
    # Clone: save_file refuses tensors that share memory (e.g. a bias in two packed tuples).
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load ``state`` (as :func:`decode_state` gives it) into the rebuilt quantized ``model``.

    Raises:
        ValueError: the state does not fit the model (another architecture was quantized).

    Example:
        >>> load_state(qmodel, decode_state(layout, tensors))  # doctest: +SKIP
    """
    rnns = _rnn_modules(model)
    plain = {k: v for k, v in state.items() if "#rnn." not in k}
    # Packed RNN weights load through set_weight_bias below; until then the rebuilt model's
    # own (placeholder) packed entries stand in, as load_state_dict reads them unconditionally.
    prefixes = tuple(f"{n}._all_weight_values." for n in rnns)
    own = model.state_dict()
    if prefixes:
        plain.update({k: v for k, v in own.items() if k.startswith(prefixes)})
    # The module versions ride in the state dict's _metadata; quantized layers read their
    # entries differently by version, so the rebuilt model's versions go along.
    loadable = OrderedDict(plain)
    loadable._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(loadable, strict=True)
    except (RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[-1].strip()
        raise ValueError(
            f"the saved quantized state does not fit the rebuilt model ({first}); was it "
            "quantized from a different architecture? Pass that fp32 model as model=..."
        ) from None
    for name, rnn in rnns.items():
        prefix = f"{name}#rnn."
        wb = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        rnn.set_weight_bias(wb)  # type: ignore[operator]


def read_recipe(path: str | Path) -> tuple[Path, dict[str, str]]:
    """The ``model.safetensors`` under ``path`` (a folder or the file) and its metadata."""
    from kiln.safeio.tensorfile import read_header

    p = Path(path)
    file = p / WEIGHTS if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS} in {p}; quantize first: kiln quantize RUN --method dynamic"
        )
    meta = read_header(file)[1]  # a damaged header is one line naming the file
    if "kiln_quant" not in meta:
        raise ValueError(
            f"{file} is not a Kiln quantized model (no kiln_quant metadata); load fp32 "
            "weights with kiln.train.checkpoint.weights.load_model"
        )
    return file, meta


def decode_state(layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state entries the saved ``layout`` describes, rebuilt from the file's ``tensors``.

    Example:
        >>> decode_state({"w": {"t": "tensor"}}, {"w": torch.ones(2)})["w"]
        tensor([1., 1.])
    """
    return {k: _decode(k, spec, tensors) for k, spec in layout.items()}

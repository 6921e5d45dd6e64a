"""Post-training and quantization-aware int8 quantization: one entry point, five methods.

:func:`quantize` dispatches by name:

========== ==================================================================================
dynamic    ``torch.ao.quantization.quantize_dynamic``: int8 weights of Linear/LSTM/GRU,
           activations quantized on the fly (:mod:`kiln.compress.quantize.ao`).
static     FX graph mode post-training quantization (``prepare_fx``/``convert_fx``, x86
           mapping), Conv+BN+ReLU fused first, calibrated on N training batches; eager mode
           (per-layer QuantStub/DeQuantStub) for models FX cannot trace.
qat        quantization-aware training: ``prepare_qat_fx``, a short fine-tune, ``convert_fx``.
pt2e       torchao's PT2E flow (:mod:`kiln.compress.quantize.pt2e`).
onnx-int8  ONNX export + ONNX Runtime int8 (:mod:`kiln.compress.quantize.onnx`).
========== ==================================================================================

Every method returns a :class:`~kiln.compress.report.CompressedModel`.

**Saved format** (dynamic, static, qat; :mod:`kiln.compress.quantize.saved`): one
``model.safetensors`` holding the converted
model's state with each int8 tensor stored as its integer values plus scale/zero point, and
in its metadata the recipe (method, mode, backend, example shape) and, when known, the Kiln
config that rebuilds the fp32 architecture. No pickle is involved: :func:`load_quantized`
rebuilds the fp32 model, repeats the same deterministic prepare/convert, and loads the saved
state, so the reloaded model gives the same outputs. (``torch.save`` of a converted model
does not load with ``weights_only=True`` for LSTM/GRU, whose packed weights are script
objects; safetensors avoids pickle altogether.)

The ``torch.ao.quantization`` APIs are deprecated in torch 2.13 and warn when called; they
still work and Kiln keeps them for their speed on x86 (see ``docs/techniques/quantization.md``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    >>> q = quantize(net, "dynamic")                            # doctest: +SKIP
    >>> q.predict(torch.randn(2, 64)).shape                     # doctest: +SKIP
    torch.Size([2, 10])
    >>> path = q.save(Path("out"))                              # doctest: +SKIP
    >>> again = load_quantized(path, model=net)                 # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compress.quantize import ao
from kiln.compress.quantize.ao import Finetune
from kiln.compress.quantize.saved import decode_state, load_state, read_recipe
from kiln.compress.report import CompressedModel
from kiln.run import data_info_from_json

__all__ = [
    "AO_METHODS",
    "METHODS",
    "first_inputs",
    "load_quantized",
    "quantize",
    "reload_max_abs_diff",
]

METHODS = ("dynamic", "static", "qat", "pt2e", "onnx-int8")
AO_METHODS = ("dynamic", "static", "qat")  # the torch.ao flows, saved and reloaded here


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ValueError listing them."""
    if method not in METHODS:
        from kiln.config import did_you_mean

        raise ValueError(
            f"unknown quantization method {method!r}; {did_you_mean(method, list(METHODS))}"
            f"allowed: {', '.join(METHODS)}"
        )
    return method


def quantize(
    model: nn.Module,
    method: str,
    *,
    calib_loader: Iterable[Any] | None = None,
    example: torch.Tensor | None = None,
    calib_batches: int = 32,
    finetune: Finetune | None = None,
    metadata: dict[str, str] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    onnx_static: bool | None = None,
) -> CompressedModel:
    """Quantize ``model`` to int8 with ``method`` (see the module docstring for the methods).

    Args:
        model: the trained fp32 model (not changed; each method works on a copy).
        method: ``dynamic``, ``static``, ``qat``, ``pt2e`` or ``onnx-int8``.
        calib_loader: batches ``(x, y)`` (or ``x``) from the training data: calibration for
            ``static``, ``pt2e`` and static ``onnx-int8``.
        example: an input batch (traces the graph; its shape is saved with the model).
        calib_batches: how many batches of ``calib_loader`` calibrate.
        finetune: for ``qat``: trains the prepared model in place (or returns the trained
            one), e.g. :func:`kiln.compress.quantize.ao.trainer_finetune` or the user's loop.
        metadata: extra safetensors metadata to save (Kiln writes the config that rebuilds
            the fp32 model, so :func:`load_quantized` needs no ``model=``).
        leaf_modules: module classes FX must not trace into (kept opaque, not quantized).
        onnx_static: for ``onnx-int8``: static (calibrated QDQ) or dynamic ORT int8; None
            picks static for models with convolutions (ORT's dynamic ConvInteger is slower
            than fp32) and dynamic otherwise.

    Raises:
        ValueError: unknown method, missing inputs, or no layer the method can quantize.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
        >>> quantize(net, "dynamic")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: no Linear/LSTM/GRU layer to quantize; found: Conv2d x1, ReLU x1; ...
    """
    check_method(method)
    if method == "dynamic":
        return ao.quantize_dynamic(model, metadata=metadata)
    if example is None:
        raise ValueError(f"--method {method} needs an example input batch (example=...)")
    if method == "qat":
        if finetune is None:
            raise ValueError("qat needs finetune=<callable that trains the prepared model>")
        return ao.quantize_qat(
            model, example, finetune, leaf_modules=leaf_modules, metadata=metadata
        )
    if calib_loader is None:
        raise ValueError(f"--method {method} needs calibration batches (calib_loader=...)")
    calib = first_inputs(calib_loader, calib_batches)
    if method == "static":
        return ao.quantize_static(
            model, calib, example, leaf_modules=leaf_modules, metadata=metadata
        )
    if method == "pt2e":
        from kiln.compress.quantize.pt2e import quantize_pt2e

        return quantize_pt2e(model, calib, example, calib_batches=len(calib))
    if onnx_static is None:
        onnx_static = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    from kiln.compress.quantize.onnx import quantize_onnx_int8

    return quantize_onnx_int8(model, calib, example, static=onnx_static, calib_batches=len(calib))


# --------------------------------------------------------------------------- small helpers


def first_inputs(loader: Iterable[Any], n: int) -> list[torch.Tensor]:
    """The inputs of the first ``n`` batches of ``loader`` (``(x, y)`` pairs or bare ``x``).

    Example:
        >>> first_inputs([(torch.ones(2, 3), torch.zeros(2))] * 5, 2)[1].shape
        torch.Size([2, 3])
    """
    if n < 1:
        raise ValueError(f"calibration needs at least one batch, got calib_batches={n}")
    out: list[torch.Tensor] = []
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"calibration batches must be tensors or (x, y) pairs, got {type(x).__name__}"
            )
        out.append(x.detach().cpu())
        if len(out) == n:
            break
    if not out:
        raise ValueError("the calibration loader gave no batch")
    return out


def load_quantized(
    path: str | Path, *, model: nn.Module | None = None, trust_code: bool = False
) -> nn.Module:
    """Reload a model saved by a ``dynamic``, ``static`` or ``qat`` :class:`CompressedModel`.

    Args:
        path: the output folder (holding ``model.safetensors``) or the file itself.
        model: the fp32 architecture (any weights) for models Kiln cannot rebuild from the
            saved config (a user's own class built in Python).
        trust_code: allow the saved config's ``model.target`` import path to be imported and
            called (see :mod:`kiln.trust`); off, only registry models are rebuilt.

    Returns:
        The quantized model, in evaluation mode, with the saved int8 weights.

    Example:
        >>> q = load_quantized("runs/digits/quantized/static")   # doctest: +SKIP
        >>> q(torch.randn(1, 1, 32, 32)).shape                    # doctest: +SKIP
        torch.Size([1, 10])
    """
    from safetensors.torch import load_file

    file, meta = read_recipe(path)
    recipe = json.loads(meta["kiln_quant"])
    if recipe.get("method") not in AO_METHODS:
        raise ValueError(
            f"{file} holds a {recipe.get('method')!r} model; load_quantized reloads "
            f"{', '.join(AO_METHODS)}; read a pt2e file with kiln.compress.quantize.pt2e."
            "load_pt2e and an onnx-int8 file with kiln.deploy.onnx.onnx_session"
        )
    if model is None:
        model = _fp32_from_metadata(file, meta, trust_code=trust_code)
    qmodel = ao.rebuild(recipe, model)
    layout = json.loads(meta["kiln_quant_layout"])
    tensors = load_file(str(file))
    load_state(qmodel, decode_state(layout, tensors))
    return qmodel.eval()


def reload_max_abs_diff(
    result: CompressedModel,
    path: str | Path,
    x: torch.Tensor,
    *,
    model: nn.Module | None = None,
    trust_code: bool = False,
) -> float:
    """Reload the file ``result.save`` wrote and return its largest output difference on ``x``.

    Each method's file is read back the way a user would read it, and compared with the
    in-memory model of the same kind:

    * ``dynamic``/``static``/``qat``: :func:`load_quantized` (rebuilt from the saved config and
      state) against ``result.predict``;
    * ``pt2e``: :func:`~kiln.compress.quantize.pt2e.load_pt2e` against ``result.module``,
      the converted Q/DQ program before compilation (the compiled, frozen program's int8
      kernels round differently, so it is not the reference for the file's contents);
    * ``onnx-int8``: a new ONNX Runtime session over the file against ``result.predict``.

    A file that holds the same model gives 0.0.

    Args:
        result: what :func:`quantize` returned, saved with ``result.save``.
        path: the file ``result.save`` returned (or, for ``dynamic``/``static``/``qat``, its
            folder).
        x: an input batch.
        model: for ``dynamic``/``static``/``qat``: the fp32 architecture, when the file holds no
            Kiln config to rebuild it from (see :func:`load_quantized`).
        trust_code: passed to :func:`load_quantized` (a saved ``model.target`` import path).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
        >>> q = quantize(net, "dynamic")                                # doctest: +SKIP
        >>> path = q.save(Path("out"))                                  # doctest: +SKIP
        >>> reload_max_abs_diff(q, path, torch.randn(4, 8), model=net)  # doctest: +SKIP
        0.0
    """
    method = check_method(result.method)
    if method in AO_METHODS:
        saved: Callable[[torch.Tensor], torch.Tensor] = load_quantized(
            path, model=model, trust_code=trust_code
        )
        reference = result.predict
    elif method == "pt2e":
        from kiln.compress.quantize.pt2e import load_pt2e

        if result.module is None:
            raise ValueError("a pt2e result without its converted program (module) to compare")
        saved, reference = load_pt2e(path), result.module
    else:
        from kiln.deploy.onnx import onnx_predict, onnx_session

        saved, reference = onnx_predict(onnx_session(Path(path))), result.predict
    with torch.inference_mode():
        return float((saved(x).float() - reference(x).float()).abs().max())


def _fp32_from_metadata(file: Path, meta: dict[str, str], *, trust_code: bool) -> nn.Module:
    if "kiln_config" not in meta or "kiln_data_info" not in meta:
        raise ValueError(
            f"{file} has no Kiln config to rebuild the fp32 architecture from; pass "
            "model=<the fp32 nn.Module it was quantized from>"
        )
    import yaml

    from kiln.config import Config
    from kiln.registry import build_model
    from kiln.trust import refuse_file_target

    cfg = Config.model_validate(yaml.safe_load(meta["kiln_config"]))
    refuse_file_target(cfg.model.target, file, trust_code=trust_code)
    return build_model(cfg.model, data_info_from_json(meta["kiln_data_info"])).eval()

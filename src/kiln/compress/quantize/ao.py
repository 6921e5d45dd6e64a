"""The ``torch.ao.quantization`` flows: dynamic, static (FX or eager) and QAT.

Each flow is a deterministic function of the fp32 architecture and a few settings (the
*recipe*), followed by data-dependent values (calibrated scales, fine-tuned weights). The
recipe is saved with the model, and :func:`rebuild` replays it on a fresh fp32 model, so a
saved state dict loads into exactly the same structure (:func:`kiln.compress.quantize.core.
load_quantized`).

* **dynamic**: ``quantize_dynamic`` of Linear/LSTM/GRU; int8 weights, activations quantized
  per batch at run time. No calibration; convolutions stay fp32.
* **static**: Kiln's :func:`~kiln.compress.fuse.fuse` first (Conv+BN+ReLU, linear chains),
  then ``prepare_fx`` with the backend's default qconfig mapping, a forward pass over the
  calibration batches, and ``convert_fx``: int8 activations between int8 kernels.
  A model FX cannot trace falls back to eager mode: Conv/Linear (+BN+ReLU) runs inside
  ``nn.Sequential`` s are fused, and each Conv/Linear layer is wrapped in its own
  ``QuantStub``/``DeQuantStub``, so the ops between them stay fp32 (slower, but it works on
  any forward).
* **qat**: ``prepare_qat_fx`` on a training-mode copy (fake quantization, BN folded during
  training), a short fine-tune by a callable (:func:`trainer_finetune` runs Kiln's Trainer),
  then ``convert_fx``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(144, 10)).eval()
    >>> x = torch.randn(8, 1, 8, 8)
    >>> q = quantize_static(net, [x], x)                       # doctest: +SKIP
    >>> q.notes["mode"], q.notes["quantized"]                  # doctest: +SKIP
    ('fx', {'ConvReLU2d': 1, 'Linear': 1})
"""

from __future__ import annotations

import copy
import importlib
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.compress.fuse import HOW_TO_TRACE, UntraceableError, fuse, fuse_sequential, trace
from kiln.compress.quantize.saved import save_quantized
from kiln.compress.report import CompressedModel
from kiln.models.summary import describe_layers
from kiln.run import METRICS, SUMMARY

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.data.base import DataBundle

__all__ = [
    "DYNAMIC_LAYERS",
    "Finetune",
    "default_backend",
    "qat_config",
    "quantize_dynamic",
    "quantize_qat",
    "quantize_static",
    "rebuild",
    "trainer_finetune",
]

# QAT's fine-tune: trains the prepared model in place, or returns the trained one.
Finetune = Callable[[nn.Module], "nn.Module | None"]
DYNAMIC_LAYERS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}
_STATIC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_backend() -> str:
    """The quantized engine to target: ``x86`` where available, else the current engine."""
    engines = torch.backends.quantized.supported_engines
    if "x86" in engines:
        return "x86"
    return str(torch.backends.quantized.engine)


# --------------------------------------------------------------------------- results


def _summary(qmodel: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Quantized layer types and the float Conv/Linear/RNN layers left, each with counts."""
    quantized: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for m in qmodel.modules():
        where = type(m).__module__
        name = type(m).__name__
        if where.startswith("torch.ao.nn.") and ".quantized" in where:
            if "Packed" not in name and name not in ("Quantize", "DeQuantize", "Dropout"):
                quantized[name] += 1  # layers, not their packed-weight holders or stubs
        elif isinstance(m, (*_STATIC_LAYERS, nn.LSTM, nn.GRU)):
            kept[name] += 1
    return dict(quantized), dict(kept)


def _result(
    method: str,
    qmodel: nn.Module,
    recipe: dict[str, Any],
    metadata: dict[str, str] | None,
    notes: dict[str, Any],
) -> CompressedModel:
    qmodel.eval()
    quantized, kept = _summary(qmodel)
    notes = {**notes, "quantized": quantized, "float_layers": kept, "recipe": recipe}

    def save(folder: Path) -> Path:
        path = save_quantized(qmodel, Path(folder), {"method": method, **recipe}, metadata)
        if path not in result.files:
            result.files.append(path)
        return path

    result = CompressedModel(method=method, predict=qmodel, save=save, module=qmodel, notes=notes)
    return result


def _messages(notes: dict[str, Any]) -> list[str]:
    return notes.setdefault("messages", [])


# --------------------------------------------------------------------------- dynamic


def _dynamic(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    spec = {DYNAMIC_LAYERS[name] for name in layers}
    return ao_quantize_dynamic(copy.deepcopy(model).eval(), spec, dtype=torch.qint8)


def quantize_dynamic(
    model: nn.Module,
    *,
    layers: Sequence[str] = ("Linear", "LSTM", "GRU"),
    metadata: dict[str, str] | None = None,
) -> CompressedModel:
    """Dynamic int8 quantization of the Linear/LSTM/GRU layers of ``model`` (a copy).

    Raises:
        ValueError: an unknown layer name, or the model has none of those layers (the
            message lists what it has).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> q = quantize_dynamic(net)                              # doctest: +SKIP
        >>> q.notes["quantized"]                                   # doctest: +SKIP
        {'Linear': 2}
    """
    unknown = [name for name in layers if name not in DYNAMIC_LAYERS]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; allowed: {', '.join(DYNAMIC_LAYERS)}")
    targets = tuple(DYNAMIC_LAYERS[name] for name in layers)
    if not any(type(m) in targets for m in model.modules()):
        raise ValueError(
            f"no {'/'.join(layers)} layer to quantize; found: {describe_layers(model)}; "
            "dynamic quantization covers only those layers: use --method static (or qat) "
            "for convolutions"
        )
    qmodel = _dynamic(model, layers)
    notes: dict[str, Any] = {"mode": "eager"}
    result = _result("dynamic", qmodel, {"mode": "eager", "layers": list(layers)}, metadata, notes)
    left = result.notes["float_layers"]
    if left:
        shown = ", ".join(f"{k} x{v}" for k, v in left.items())
        _messages(result.notes).append(
            f"dynamic quantization leaves {shown} in fp32; --method static or qat quantizes them"
        )
    return result


# --------------------------------------------------------------------------- static


def _leaf_names(leaf_modules: Sequence[type[nn.Module]]) -> list[str]:
    return [f"{cls.__module__}:{cls.__qualname__}" for cls in leaf_modules]


def _leaf_classes(names: Sequence[str]) -> list[type[nn.Module]]:
    out = []
    for name in names:
        module, _, qualname = name.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        out.append(obj)
    return out


def _custom_config(leaf_modules: Sequence[type[nn.Module]]) -> Any:
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    from kiln.models.layers import DropPath

    # Modules that branch on self.training (DropPath) must stay modules, not traced code.
    return PrepareCustomConfig().set_non_traceable_module_classes([DropPath, *leaf_modules])


def _check_static_layers(model: nn.Module, method: str) -> None:
    if not any(isinstance(m, _STATIC_LAYERS) for m in model.modules()):
        raise ValueError(
            f"no Conv1d/Conv2d/Conv3d/Linear layer to quantize; found: {describe_layers(model)}; "
            f"--method {method} quantizes those layers only"
        )


def _fx_static(
    model: nn.Module, example: torch.Tensor, backend: str, leaf_modules: Sequence[type[nn.Module]]
) -> tuple[nn.Module, Any]:
    """Fused, prepared (observed) copy of ``model`` and the fusion report."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    fused, report = fuse(model, leaf_modules=leaf_modules)
    prepared = prepare_fx(
        fused,
        get_default_qconfig_mapping(backend),
        (example[:1],),
        prepare_custom_config=_custom_config(leaf_modules),
    )
    return prepared, report


def _eager_static(model: nn.Module, backend: str) -> tuple[nn.Module, Any]:
    """Per-layer QuantStub/DeQuantStub wrapping of a fused copy (for untraceable models)."""
    import torch.ao.nn.intrinsic as nni
    from torch.ao.quantization import QuantWrapper, get_default_qconfig, prepare

    fused, report = fuse_sequential(model)
    layer_types = (*_STATIC_LAYERS, nni.ConvReLU1d, nni.ConvReLU2d, nni.ConvReLU3d)
    names: list[str] = []
    for name, m in fused.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)  # the conv of a ConvReLU
        if name and type(m) in layer_types and not inside:
            names.append(name)
    qconfig = get_default_qconfig(backend)
    for name in names:
        parent, _, attr = name.rpartition(".")
        wrapper = QuantWrapper(fused.get_submodule(name))
        wrapper.qconfig = qconfig
        setattr(fused.get_submodule(parent) if parent else fused, attr, wrapper)
    return prepare(fused), report


def _convert(prepared: nn.Module, mode: str) -> nn.Module:
    if mode == "fx":
        from torch.ao.quantization.quantize_fx import convert_fx

        return convert_fx(prepared)  # type: ignore[arg-type]
    from torch.ao.quantization import convert

    return convert(prepared)


def quantize_static(
    model: nn.Module,
    calib: Sequence[torch.Tensor],
    example: torch.Tensor,
    *,
    backend: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    metadata: dict[str, str] | None = None,
) -> CompressedModel:
    """Post-training static int8 quantization, calibrated on ``calib`` (input batches).

    FX graph mode when ``torch.fx`` can trace the model, else eager mode with a message in
    ``notes["messages"]`` saying what to change to get graph mode.

    Raises:
        ValueError: the model has no Conv/Linear layer (the message lists what it has).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x = torch.randn(16, 8)
        >>> q = quantize_static(net, [x], x)                       # doctest: +SKIP
        >>> q.predict(x).shape                                     # doctest: +SKIP
        torch.Size([16, 2])
    """
    _check_static_layers(model, "static")
    backend = backend or default_backend()
    notes: dict[str, Any] = {}
    try:
        prepared, report = _fx_static(model, example, backend, leaf_modules)
        mode = "fx"
    except UntraceableError as exc:
        prepared, report = _eager_static(model, backend)
        mode = "eager"
        _messages(notes).append(
            f"torch.fx cannot trace {exc.model_name} ({exc.reason}), so static quantization "
            "ran in eager mode: each Conv/Linear layer runs between its own QuantStub/"
            "DeQuantStub and the ops between them stay fp32 (slower than graph mode). "
            f"For graph mode, {HOW_TO_TRACE}"
        )
    with torch.no_grad():  # observers update their buffers in place
        for x in calib:
            prepared(x)
    qmodel = _convert(prepared, mode)
    notes.update(mode=mode, fused=report.to_dict(), calib_batches=len(calib))
    recipe = {
        "mode": mode,
        "backend": backend,
        "example_shape": [1, *example.shape[1:]],
        "leaf_modules": _leaf_names(leaf_modules),
    }
    return _result("static", qmodel, recipe, metadata, notes)


# --------------------------------------------------------------------------- qat


def _qat_prepare(
    model: nn.Module, example: torch.Tensor, backend: str, leaf_modules: Sequence[type[nn.Module]]
) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    m = copy.deepcopy(model).train()
    try:
        trace(m, leaf_modules=leaf_modules)
    except UntraceableError as exc:
        raise UntraceableError(
            f"torch.fx cannot trace {exc.model_name} ({exc.reason}) and QAT needs graph mode: "
            f"{HOW_TO_TRACE}. --method static works on it as it is (eager mode)",
            model_name=exc.model_name,
            reason=exc.reason,
        ) from None
    return prepare_qat_fx(
        m,
        get_default_qat_qconfig_mapping(backend),
        (example[:1],),
        prepare_custom_config=_custom_config(leaf_modules),
    )


def quantize_qat(
    model: nn.Module,
    example: torch.Tensor,
    finetune: Finetune,
    *,
    backend: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    metadata: dict[str, str] | None = None,
) -> CompressedModel:
    """Quantization-aware training: prepare (fake quant), ``finetune(prepared)``, convert.

    Args:
        model: the trained fp32 model (not changed).
        example: an input batch (traces the graph).
        finetune: trains the prepared model in place, or returns the trained model; e.g.
            :func:`trainer_finetune` or a few epochs of the user's own loop.
        backend: quantized engine (default :func:`default_backend`).
        leaf_modules: classes FX must not trace into.
        metadata: extra safetensors metadata to save.

    Example:
        >>> def finetune(prepared):                                # doctest: +SKIP
        ...     train_a_few_epochs(prepared, lr=1e-4)
        >>> q = quantize_qat(net, x, finetune)                     # doctest: +SKIP
    """
    _check_static_layers(model, "qat")
    backend = backend or default_backend()
    prepared = _qat_prepare(model, example, backend, leaf_modules)
    trained = finetune(prepared)
    prepared = trained if trained is not None else prepared
    from torch.ao.quantization.quantize_fx import convert_fx

    qmodel = convert_fx(prepared.eval())  # type: ignore[arg-type]
    recipe = {
        "mode": "fx",
        "backend": backend,
        "example_shape": [1, *example.shape[1:]],
        "leaf_modules": _leaf_names(leaf_modules),
    }
    return _result("qat", qmodel, recipe, metadata, {"mode": "fx"})


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def qat_config(cfg: Config, *, epochs: int, lr_factor: float = 0.1) -> tuple[Config, list[str]]:
    """The fine-tuning config for QAT from a run's config, and each change with its reason.

    Example:
        >>> from kiln.config import load_config
        >>> cfg, changes = qat_config(load_config(None, ["ema.enabled=true"]), epochs=2)
        >>> cfg.train.epochs, cfg.ema.enabled
        (2, False)
    """
    from kiln.config import validate

    raw = cfg.model_dump(mode="json")
    changes: list[str] = []

    def put(path: str, value: Any, reason: str | None) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if node.get(leaf) != value:
            if reason:
                changes.append(f"{path}: {_show(node.get(leaf))} -> {_show(value)} ({reason})")
            node[leaf] = value

    put("train.epochs", epochs, None)
    put("train.max_steps", None, None)
    put("optim.lr", cfg.optim.lr * lr_factor, f"fine-tuning uses {lr_factor:g} x the run's LR")
    if cfg.scheduler.name != "cosine" or cfg.scheduler.min_lr != 0.0:
        raw["scheduler"] = {"name": "cosine"}  # every other scheduler field at its default
        changes.append(
            f"scheduler: {cfg.scheduler.name!r} -> 'cosine' (a short fine-tune decays from the "
            "lower LR, no warm-up)"
        )
    put("precision", "fp32", "fake quantization observes fp32 activations")
    put("compile", False, "observers change every step; compiling a short fine-tune costs more")
    put("channels_last", False, "the prepared graph is traced in the default memory format")
    if cfg.strategy not in ("auto", "single"):
        put("strategy", "single", "the prepared model trains in one process")
    put("ema.enabled", False, "averaged weights would not match the observed ranges")
    put("swa.enabled", False, "SWA's BN update does not apply to fused conv-bn QAT modules")
    put("train.activation_checkpointing", False, "it targets modules of the fp32 model")
    put("freeze.modules", [], "names refer to the fp32 model's modules")
    put("freeze.unfreeze_at", {}, "names refer to the fp32 model's modules")
    put("resume", None, None)
    put("log.tensorboard", False, None)
    put("log.progress", False, None)
    return validate(raw), changes


def trainer_finetune(
    cfg: Config,
    data: DataBundle,
    *,
    keep: Path | None = None,
    verbose: bool = False,
) -> Callable[[nn.Module], nn.Module]:
    """A ``finetune`` for :func:`quantize_qat`: :func:`kiln.compress.finetune.finetune_in_run`.

    Pass ``cfg`` through :func:`qat_config` first. The run goes to a temporary directory; its
    ``metrics.jsonl`` and ``summary.json`` are copied to ``keep`` as ``qat_metrics.jsonl`` and
    ``qat_summary.json``. The prepared model ends with the weights the run kept (the best by
    its monitored metric), on the CPU in eval mode.

    Example:
        >>> qcfg, _ = qat_config(cfg, epochs=2)  # doctest: +SKIP
        >>> q = quantize_qat(net, x, trainer_finetune(qcfg, data))  # doctest: +SKIP
    """

    def finetune(prepared: nn.Module) -> nn.Module:
        from kiln.compress.finetune import finetune_in_run

        with tempfile.TemporaryDirectory(prefix="kiln-qat-") as tmp:
            finetune_in_run(cfg, prepared, data, tmp, verbose=verbose)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for name in (METRICS, SUMMARY):
                    if (Path(tmp) / name).is_file():
                        shutil.copy(Path(tmp) / name, keep / f"qat_{name}")
        return prepared

    return finetune


# --------------------------------------------------------------------------- reload


def rebuild(recipe: dict[str, Any], model: nn.Module) -> nn.Module:
    """Replay ``recipe`` on the fp32 ``model``: the converted structure, before its state loads.

    Calibration values do not matter here (the saved state replaces them); one forward pass
    of zeros gives the observers a range so conversion runs without warnings.
    """
    method, mode = recipe["method"], recipe.get("mode", "fx")
    if method == "dynamic":
        return _dynamic(model, recipe["layers"])
    backend = recipe["backend"]
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"this model was quantized for the {backend!r} engine, which this torch build "
            f"lacks (supported: {torch.backends.quantized.supported_engines})"
        )
    leaves = _leaf_classes(recipe.get("leaf_modules", []))
    zeros = torch.zeros(recipe["example_shape"])
    if method == "qat":
        prepared = _qat_prepare(model, zeros, backend, leaves).eval()
    elif mode == "fx":
        prepared, _ = _fx_static(model, zeros, backend, leaves)
    else:
        prepared, _ = _eager_static(model, backend)
    with torch.no_grad():
        prepared(zeros)
    return _convert(prepared, mode)

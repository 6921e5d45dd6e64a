"""Int8 quantization through PT2E: ``torch.export``, torchao's X86 Inductor quantizer, Inductor.

:func:`quantize_pt2e` captures the model with ``torch.export`` (dynamic batch), inserts observers
with torchao's ``X86InductorQuantizer``, calibrates, converts to a Q/DQ program and compiles it
with Inductor **with freezing on**. Freezing is what turns the Q/DQ pattern into oneDNN int8
kernels with pre-packed weights; without it the compiled program is no faster than fp32. The
program saves as a ``.pt2`` file (``torch.export.save``); :func:`load_pt2e` reads it back.

This module also holds the calibration-input reader the ONNX path
(:mod:`kiln.compress.quantize.onnx`) shares; the export example, the quiet loggers and torch's
pytree warning filter come from :mod:`kiln.deploy` (plain export is deploy's job).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compress.report import CompressedModel
from kiln.deploy.export_errors import no_treespec_warning, quiet_export, quiet_loggers
from kiln.deploy.onnx import dynamic_batch_example

__all__ = ["PT2E_FILE", "load_pt2e", "quantize_pt2e"]

PT2E_FILE = "model_pt2e.pt2"

_TORCHAO_HINT = (
    "PT2E quantization needs torchao: pip install torchao (or pip install 'kiln[compress]')"
)
# Import-time log lines of torchao (CUDA kernels it cannot load on a CPU build) and of torch's
# pytree module (torchao registers an Enum as a pytree constant): noise, not advice for the user.
_TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")


# ----------------------------------------------------------------------------- helpers


def _import_torchao() -> Any:
    """torchao's PT2E entry points (a namespace), imported without its import-time log lines.

    Importing it also registers the ``quantized_decomposed`` ops a saved PT2E program uses.

    Raises:
        ImportError: torchao is not installed (the message says how to install it).
    """
    from types import SimpleNamespace

    with quiet_loggers(_TORCHAO_LOGGERS):
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
        except ImportError as e:
            raise ImportError(f"{_TORCHAO_HINT} ({e})") from e
    return SimpleNamespace(
        prepare_pt2e=prepare_pt2e,
        convert_pt2e=convert_pt2e,
        X86InductorQuantizer=X86InductorQuantizer,
        default_config=get_default_x86_inductor_quantization_config,
    )


def _calib_inputs(loader: Iterable[Any], batches: int) -> Iterator[torch.Tensor]:
    """The inputs of the first ``batches`` batches (``(x, y)`` pairs or bare tensors)."""
    if batches < 1:
        raise ValueError(f"calib_batches must be >= 1, got {batches}")
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"calibration batches must be tensors or (x, y) pairs of tensors, got {type(x)}"
            )
        yield x.detach().to("cpu", torch.float32)
        seen += 1
        if seen >= batches:
            return
    if seen == 0:
        raise ValueError("the calibration loader is empty; pass the training loader")


# ----------------------------------------------------------------------------- PT2E


def _export_dynamic(model: nn.Module, example: torch.Tensor) -> tuple[Any, str | None]:
    """``torch.export`` with a dynamic batch dimension, or a static one if the model forbids it.

    Returns the program and None, or, after the fallback, a sentence saying what happened.
    """
    batch = torch.export.Dim("batch", min=1)
    try:
        with quiet_export():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), None
    except Exception as e:  # e.g. a reshape that fixes the batch size: fall back to a static shape
        fallback = (
            f"torch.export could not capture the model with a dynamic batch size ({_first(e)}); "
            f"it was captured with the example's fixed batch of {len(example)} instead, so the "
            f"int8 program takes batches of {len(example)} only"
        )
    return torch.export.export(model, (example,)), fallback


def _first(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _drop_unused_tensors(program: torch.fx.GraphModule) -> list[str]:
    """Delete parameters and buffers the graph no longer reads; returns their names.

    ``convert_pt2e`` folds each weight's quantization into an int8 constant but leaves the fp32
    weight attached to the module, so the saved program would carry both (larger than fp32).
    """
    used = {str(n.target) for n in program.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name, _ in [*program.named_parameters(), *program.named_buffers()]:
        if name in used:
            continue
        owner, _, attr = name.rpartition(".")
        delattr(program.get_submodule(owner), attr)
        dropped.append(name)
    return dropped


@contextlib.contextmanager
def _frozen_compilation() -> Iterator[None]:
    """Inductor freezing on (and its known harmless warning off) for the compilations inside."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), warnings.catch_warnings():
        # Inductor's oneDNN int8 lowering (torch/_inductor/mkldnn_lowerings.py) copies a tensor
        # with torch.tensor(tensor), which warns "To copy construct from a tensor, it is
        # recommended to use sourceTensor.detach().clone() ..."; torch's own code, harmless.
        warnings.filterwarnings(
            "ignore", message="To copy construct from a tensor", category=UserWarning
        )
        yield


class _FrozenProgram:
    """A converted PT2E program compiled by Inductor with freezing on, called like ``predict``.

    Freezing is read when Inductor compiles, which happens at the first call with inputs the
    compiled code has no graph for, not in ``torch.compile``. So the first call with each new
    input signature (shape, strides, dtype, device, inference-ness: what Dynamo's guards check)
    runs inside ``torch._inductor.config.patch(freezing=True)``, which restores the global flag
    afterwards, and later calls go straight to the compiled code. Inputs are detached first, so
    a view and its base never count as different inputs. Graphs:

    * ``dynamic``: one for batch 1 and one for every batch >= 2 (tried first);
    * static, when the dynamic graph fails (Inductor's int8 convolution lowering does in torch
      2.13 with a symbolic batch): one per batch size, up to
      ``torch._dynamo.config.recompile_limit`` (8) sizes; beyond that Dynamo runs the
      uncompiled Q/DQ program, correct but slower than fp32.
    """

    def __init__(
        self, program: nn.Module, example: torch.Tensor, *, fixed_batch: bool = False
    ) -> None:
        self.fallback: str | None = None  # what failed and what runs instead, in words
        self.seen: set[tuple[Any, ...]] = set()
        if fixed_batch:  # exported with the example's batch size: the only one it takes
            self._compile(program, dynamic=False)
            self(example)
            return
        try:
            # A deep copy has its own forward code object, hence its own Dynamo cache: a failed
            # dynamic attempt leaves nothing behind for the static compilation below.
            with no_treespec_warning():
                clone = copy.deepcopy(program)
            self._compile(clone, dynamic=True)
            for x in (example, example[:1], torch.cat([example, example[:1]])):
                self(x)
        except Exception as e:  # Inductor lowering errors carry no common public type
            self.fallback = (
                "Inductor could not compile the int8 program for a dynamic batch size "
                f"({_first(e)}; torch 2.13's int8 convolution lowering fails this way on conv "
                "nets), so one static graph is compiled per batch size instead: batch 1 and "
                f"{len(example)} now, each new size at its first call, up to "
                "torch._dynamo.config.recompile_limit sizes; beyond that the uncompiled Q/DQ "
                "program runs (same outputs, slower)"
            )
            self._compile(program, dynamic=False)
            for x in (example, example[:1]):
                self(x)

    def _compile(self, program: nn.Module, *, dynamic: bool) -> None:
        self.dynamic = dynamic
        self.seen.clear()
        self.compiled = torch.compile(program, dynamic=dynamic)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        key = (x.shape, x.stride(), x.dtype, x.device, x.is_inference())
        if key in self.seen and torch.is_inference_mode_enabled():  # the hot path: no context
            out: torch.Tensor = self.compiled(x)
            return out
        with torch.inference_mode():
            if key in self.seen:
                out = self.compiled(x)
                return out
            with _frozen_compilation():
                out = self.compiled(x)
        self.seen.add(key)
        return out


def quantize_pt2e(
    model: nn.Module,
    calib_loader: Iterable[Any],
    example: torch.Tensor,
    *,
    calib_batches: int = 32,
) -> CompressedModel:
    """Static int8 via PT2E: export, X86 Inductor quantizer, calibrate, convert, compile frozen.

    Steps: ``torch.export.export(model.eval(), (example,))`` with a dynamic batch dimension (a
    static one if the model fixes its batch size; ``notes["dynamic_batch"]`` says which),
    ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default config (int8 activations per
    tensor, int8 weights per channel), ``calib_batches`` batches through the observers,
    ``convert_pt2e``, then ``torch.compile`` with ``torch._inductor.config.freezing`` set to
    True only while Inductor compiles: here, for batch 1, the example's batch size and one more;
    later, at the first call with any new input signature. The global flag is restored after
    each compilation (see :class:`_FrozenProgram`).

    Args:
        model: a float model on the CPU; it is put in eval mode.
        calib_loader: batches of ``(x, y)`` (or bare inputs) representative of real inputs,
            usually the training loader.
        example: one input batch; its shape (except the batch size) is fixed by the export.
        calib_batches: how many batches to calibrate on.

    Returns:
        ``predict`` runs the compiled int8 program under ``torch.inference_mode``; ``module``
        is the converted (uncompiled reference) program; ``save(folder)`` writes
        ``model_pt2e.pt2``, which :func:`load_pt2e` reads back.

    Raises:
        ImportError: torchao is not installed.
        ValueError: the calibration loader is empty.

    Example:
        >>> q = quantize_pt2e(model, train_loader, next(iter(test_loader))[0])  # doctest: +SKIP
        >>> q.predict(x).argmax(-1)                                                 # doctest: +SKIP
        >>> load_pt2e(q.save(Path("out")))(x)                                       # doctest: +SKIP
    """
    ao = _import_torchao()
    model = model.eval()
    ex = dynamic_batch_example(example)
    exported, export_fallback = _export_dynamic(model, ex)
    dynamic = export_fallback is None
    quantizer = ao.X86InductorQuantizer()
    quantizer.set_global(ao.default_config())
    prepared = ao.prepare_pt2e(exported.module(), quantizer)
    n_calib = 0
    with torch.no_grad():  # observers update buffers in place: no inference tensors in them
        for x in _calib_inputs(calib_loader, calib_batches):
            prepared(x)
            n_calib += 1
    converted = ao.convert_pt2e(prepared)
    dropped = _drop_unused_tensors(converted)
    predict = _FrozenProgram(converted, ex, fixed_batch=not dynamic)

    files: list[Path] = []

    def save(folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PT2E_FILE
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
        with torch.no_grad():
            # Two rows are enough for the sample input the archive stores next to the program.
            sample = ex[:2].clone() if dynamic else ex.clone()
            program = torch.export.export(converted, (sample,), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
        files[:] = [path]
        return path

    notes = {
        "dynamic_batch": dynamic,
        "calib_batches": n_calib,
        "quantizer": "X86InductorQuantizer (default config: static int8, per-channel weights)",
        "compiled": "dynamic batch" if predict.dynamic else "static, one graph per batch size",
        "freezing": "on while Inductor compiles a new input signature; the global flag is restored",
        "fp32_tensors_dropped": len(dropped),
        # Each fallback in words (what failed, what is used instead); kiln quantize prints them.
        "messages": [m for m in (export_fallback, predict.fallback) if m is not None],
    }
    return CompressedModel("pt2e", predict, save, module=converted, files=files, notes=notes)


def load_pt2e(path: str | Path, *, trust_code: bool = False) -> nn.Module:
    """Load a program written by :func:`quantize_pt2e`'s ``save`` as a callable module.

    The archive is inspected first (:func:`kiln.trust.check_pt2`): one whose loading would
    unpickle entries is refused unless ``trust_code``.

    torchao is imported first: it registers the ``quantized_decomposed`` ops the program uses.
    The module runs the reference Q/DQ graph; wrap it in ``torch.compile`` under
    ``torch._inductor.config.patch(freezing=True)`` for int8 speed.

    Raises:
        ImportError: torchao is not installed.
        FileNotFoundError: no file at ``path``.
        kiln.errors.UnsafeFileError: the archive would unpickle entries and ``trust_code`` is off.

    Example:
        >>> net = load_pt2e("out/model_pt2e.pt2")   # doctest: +SKIP
        >>> net(torch.randn(5, 64)).shape           # doctest: +SKIP
        torch.Size([5, 10])
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no PT2E program at {p}; write one with quantize_pt2e(...).save(folder)"
        )
    _import_torchao()
    from kiln.trust import check_pt2

    check_pt2(p, trust_code=trust_code)
    module: nn.Module = torch.export.load(str(p)).module()
    return module

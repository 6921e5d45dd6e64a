"""Plain fp32 ONNX: export a model, open an ONNX Runtime session on the file, predict with it.

``kiln export --format onnx`` writes the file with :func:`export_onnx` and checks its parity
through :func:`onnx_session` and :func:`onnx_predict`; ``kiln quantize --method onnx-int8``
(:mod:`kiln.compress.quantize.onnx`) starts from the same fp32 export and reads its int8 file
back through the same two functions.

The export uses the dynamo exporter with a dynamic batch dimension and keeps the weights in the
one file; the session runs on the CPU execution provider with one intra-op thread unless told
otherwise, so latencies measured through it are comparable run to run.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> path = export_onnx(net, torch.randn(8, 16), "out/model.onnx")  # doctest: +SKIP
    >>> predict = onnx_predict(onnx_session(path))                     # doctest: +SKIP
    >>> predict(torch.randn(3, 16)).shape                              # doctest: +SKIP
    torch.Size([3, 4])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.deploy.export_errors import no_treespec_warning, quiet_loggers

__all__ = ["dynamic_batch_example", "export_onnx", "onnx_predict", "onnx_session", "require_onnx"]

_ONNX_HINT = (
    "the ONNX path needs onnx, onnxscript and onnxruntime: "
    "pip install onnx onnxscript onnxruntime (or pip install 'kiln[compress]')"
)
# The dynamo ONNX exporter logs "torchvision is not installed. Skipping torchvision::nms" etc.
_ONNX_LOGGERS = ("torch.onnx",)


def require_onnx() -> None:
    """Raise one clear ImportError naming every missing package of the ONNX path.

    Example:
        >>> require_onnx()  # doctest: +SKIP
    """
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{_ONNX_HINT} (missing: {', '.join(missing)})")


def dynamic_batch_example(example: torch.Tensor) -> torch.Tensor:
    """``example`` as a float32 CPU batch of at least 2 rows.

    ``torch.export`` (and the exporters built on it) specialises a batch of 1 to a constant, so
    the exported graph would take one row only; two rows keep the batch dimension dynamic.

    Example:
        >>> dynamic_batch_example(torch.zeros(1, 3)).shape
        torch.Size([2, 3])
    """
    if example.dim() == 0:
        raise ValueError("example must be a batch of inputs with the batch as dimension 0")
    example = example.detach().to("cpu", torch.float32)
    return example if len(example) >= 2 else example.repeat(2, *[1] * (example.dim() - 1))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export fp32 ONNX with the dynamo exporter: dynamic batch, weights in the one file, checked.

    The input is named ``x`` and its dimension 0 ``batch``; the output is ``output``.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing.

    Example:
        >>> export_onnx(model, torch.randn(8, 64), "out/model.onnx")  # doctest: +SKIP
        PosixPath('out/model.onnx')
    """
    require_onnx()
    import onnx

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with quiet_loggers(_ONNX_LOGGERS), no_treespec_warning():
        torch.onnx.export(
            model.eval(),
            (dynamic_batch_example(example),),
            str(p),
            dynamo=True,
            dynamic_shapes=({0: "batch"},),
            input_names=["x"],
            output_names=["output"],
            external_data=False,  # one self-contained file, even for large models
            verbose=False,
        )
    onnx.checker.check_model(str(p), full_check=True)
    return p


def onnx_session(model: str | Path | bytes, *, threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider with ``threads`` intra-op threads.

    Example:
        >>> sess = onnx_session("out/model_int8.onnx")  # doctest: +SKIP
    """
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no per-session info lines on stderr
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``predict`` function (CPU tensor in, CPU tensor out) over an ORT session's first output.

    Example:
        >>> predict = onnx_predict(onnx_session("out/model.onnx"))  # doctest: +SKIP
        >>> predict(torch.randn(3, 64)).shape                       # doctest: +SKIP
        torch.Size([3, 10])
    """
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return predict

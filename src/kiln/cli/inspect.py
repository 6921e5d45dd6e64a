"""``kiln inspect RUN|CONFIG [key.sub=value ...] [inspect.<option>=value ...]``.

Looks inside a model on one batch of its own data, with :mod:`kiln.inspect`:

* RUN (a run directory, or its ``model.safetensors``): the trained model from
  ``model.safetensors`` and the run's data (same seeded split), in eval mode.
* CONFIG (a YAML file, plus the usual overrides): the model as ``kiln train`` would build it,
  untrained (seeded initial weights), in train mode: what the first training step sees.

It prints the model summary (output shapes, parameters, MACs) and per-layer activation and
gradient statistics for one batch (forward, then backward of the run's loss), names the first
module whose output is NaN/Inf if any, and writes into ``--out`` (default ``RUN/inspect/``, or
``<out_dir>/<name>-inspect/`` for a CONFIG), replacing earlier results:

* ``inspect.json``: everything printed, plus the histograms' counts;
* ``activations.png``, ``gradients.png``: a histogram per layer;
* with ``--saliency N``: ``saliency-<method>-<k>.png``, rows of (input, map, overlay) for the
  first N examples of the split, eight per file.

Options that are not part of the job config, taken out of the arguments first:
``inspect.anomaly=true`` (autograd anomaly mode for the backward), ``inspect.layer=NAME``
(Grad-CAM layer), ``inspect.mode=train|eval``, ``inspect.split=test|val|train``,
``inspect.batch=N``, ``inspect.samples=25`` and ``inspect.noise=0.15`` (SmoothGrad: copies and
noise as a fraction of the input range), ``inspect.depth=N`` (summary rows),
``inspect.bins=40`` (:class:`kiln.cli.options.InspectOptions`). Everything runs on the CPU in
float32.

Torch is imported inside the functions, so ``kiln --help`` stays fast.

Example:
    >>> run_inspect(["runs/digits"], saliency=3, method="gradcam", out=None)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import EXTRA_ARGS, RUN_OR_CONFIG, Debug, TrustCode

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

    from kiln.config import Config
    from kiln.data.base import DataBundle
    from kiln.inspect.stats import StatsReport

__all__ = ["command", "register", "run_inspect", "split_inspect_options"]

_PER_PAGE = 8


def command(
    args: Annotated[list[str], typer.Argument(help=RUN_OR_CONFIG, show_default=False)],
    saliency: Annotated[int, typer.Option(help="saliency maps for N test samples (0 = none)")] = 0,
    method: Annotated[
        str, typer.Option(help="saliency: gradient, grad_x_input, smoothgrad, gradcam")
    ] = "gradient",
    out: Annotated[str | None, typer.Option(help="folder for PNGs and JSON")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Model summary, activation/gradient statistics, histograms and saliency maps.

    Options as overrides: inspect.anomaly, inspect.layer, inspect.mode, inspect.split,
    inspect.batch, inspect.samples, inspect.noise, inspect.depth, inspect.bins.
    """
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_inspect(args, saliency=saliency, method=method, out=out, trust_code=trust_code),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln inspect`` to ``app``."""
    app.command("inspect", context_settings=EXTRA_ARGS)(command)


def split_inspect_options(args: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Take the ``inspect.<option>=value`` arguments out; return them (with defaults) and the rest.

    The options are :class:`kiln.cli.options.InspectOptions`.

    Raises:
        kiln.errors.UsageError: an unknown option or a bad value; the message names the option,
            the allowed values and the closest option name.

    Example:
        >>> opts, rest = split_inspect_options(["c.yaml", "inspect.anomaly=true", "seed=1"])
        >>> opts["anomaly"], rest
        (True, ['c.yaml', 'seed=1'])
    """
    from kiln.cli.options import InspectOptions, parse_options, take_options

    values, rest = take_options("inspect", args)
    return parse_options(InspectOptions, "inspect", values).model_dump(), rest


@dataclass
class _Job:
    """What is inspected: the model, its config and data, and where the results go."""

    cfg: Config
    data: DataBundle
    model: nn.Module
    trained: bool
    source: dict[str, Any]
    out: Path


def _open(path: str, overrides: list[str], out: str | None, trust_code: bool = False) -> _Job:
    from kiln.config import load_config
    from kiln.train import build
    from kiln.train.reproducibility import seed_everything

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such run directory or config file: {p}")
    if p.is_dir() or p.suffix == ".safetensors":
        from kiln.run import WEIGHTS, read_config, run_dir_of
        from kiln.train.checkpoint.weights import load_model

        run_dir = run_dir_of(p)
        fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model")]
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)}: a run's model is fixed by its weights; inspect a "
                "different model from its CONFIG instead"
            )
        cfg = read_config(run_dir, overrides)
        seed_everything(cfg.seed)
        data = build.build_data_for(cfg)
        weights = p if p.is_file() else run_dir / WEIGHTS
        model = load_model(weights, trust_code=trust_code)
        source = {"kind": "run", "path": str(run_dir), "trained": True, "weights": str(weights)}
        return _Job(cfg, data, model, True, source, Path(out) if out else run_dir / "inspect")
    cfg = load_config(p, overrides)
    seed_everything(cfg.seed)  # the initial weights `kiln train` would start from
    data = build.build_data_for(cfg)
    model = build.build_model_for(cfg, data.info)
    source = {"kind": "config", "path": str(p), "trained": False, "weights": None}
    default = Path(cfg.out_dir) / f"{cfg.name}-inspect"
    return _Job(cfg, data, model, False, source, Path(out) if out else default)


def _examples(job: _Job, split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples (default: one eval batch) of ``split``, in order."""
    import torch

    from kiln.train import build

    dataset = getattr(job.data, split)
    if dataset is None or len(dataset) == 0:
        have = [s for s in ("test", "val", "train") if getattr(job.data, s) is not None]
        raise ValueError(f"this job has no {split} split; use inspect.split={have[0]}")
    loader = build.loader_for(job.cfg, dataset, train=False, device=torch.device("cpu"))
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    got = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        xs.append(x)
        ys.append(y)
        got += len(x)
        if n is None or got >= n:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if n is None else (x[:n], y[:n])


def _console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(width=150, highlight=False)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _num(v: float | None) -> str:
    import math

    return "-" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _stats_table(stats: StatsReport) -> Any:
    from rich.table import Table

    t = Table(title="per-layer statistics, one batch (activation = module output)")
    for col in ("layer", "type", "mean", "std", "zeros", "dead", "NaN/Inf"):
        t.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for col in ("grad mean", "grad std", "grad NaN/Inf"):
        t.add_column(col, justify="right")
    for layer in stats.layers:
        a, g = layer.activation, layer.gradient
        t.add_row(
            layer.name,
            layer.type,
            _num(a.mean if a else None),
            _num(a.std if a else None),
            _pct(a.zero_fraction if a else None),
            _pct(a.dead_fraction if a else None),
            str(a.nonfinite) if a else "-",
            _num(g.mean if g else None),
            _num(g.std if g else None),
            str(g.nonfinite) if g else "-",
        )
    return t


def run_inspect(
    args: list[str],
    *,
    saliency: int = 0,
    method: str = "gradient",
    out: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Inspect a run's trained model (or a config's untrained one) on one batch.

    Args:
        args: a RUN directory or a CONFIG.yaml, then ``key.sub=value`` overrides and
            ``inspect.<option>=value`` options (see the module docstring).
        saliency: saliency maps for the first N examples of the split (0: none).
        method: ``gradient``, ``grad_x_input``, ``smoothgrad`` or ``gradcam``.
        out: the output folder (default ``RUN/inspect`` or ``<out_dir>/<name>-inspect``).
        trust_code: allow a run's ``model.target`` import path (see :mod:`kiln.trust`).

    Returns:
        The report written to ``inspect.json``.

    Raises:
        ValueError: bad arguments, an unknown method, Grad-CAM on a model without
            convolutions, saliency on integer inputs.
        FileNotFoundError: no such run or config, or a run without ``model.safetensors``.
    """
    from kiln.inspect.saliency import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(saliency, bool) or saliency < 0:
        raise ValueError(f"--saliency must be a number of examples >= 0, got {saliency}")
    if method != "gradient" and saliency == 0:
        raise ValueError(f"--method {method} needs --saliency N (how many examples to explain)")
    if saliency:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "--saliency writes PNGs and needs matplotlib: pip install matplotlib (or "
                "pip install 'kiln[all]')"
            )
    opts, rest = split_inspect_options(args)
    from kiln.cli.train import split_args

    path, overrides = split_args(rest)
    if path is None:
        raise ValueError(
            "give a RUN directory or a CONFIG.yaml first, e.g. kiln inspect runs/digits"
        )
    job = _open(path, overrides, out, trust_code)
    return _inspect(job, opts, saliency=saliency, method=method)


def _inspect(job: _Job, opts: dict[str, Any], *, saliency: int, method: str) -> dict[str, Any]:
    from kiln.inspect.anomaly import AnomalyError, NonFiniteGuard, detect_anomaly
    from kiln.inspect.hooks import no_inplace, select_modules
    from kiln.inspect.saliency import default_cam_layer
    from kiln.inspect.stats import json_safe, layer_stats
    from kiln.inspect.summary import human, model_summary
    from kiln.train import build

    console = _console()
    model = job.model.float().cpu()
    x, y = _examples(job, opts["split"], opts["batch"])
    layer: str | None = opts["layer"]
    if saliency:
        if not x.is_floating_point():
            raise ValueError(
                f"saliency needs float inputs to differentiate; this model takes {x.dtype} "
                f"(task {job.data.info.task}); run kiln inspect without --saliency"
            )
        model.eval()
        if method == "gradcam" and layer is None:
            layer = default_cam_layer(model, x[:1])  # fails early for models without convs
        elif method == "gradcam" and layer is not None:
            select_modules(model, [layer])  # an unknown name fails before the long part
    mode = opts["mode"] or ("eval" if job.trained else "train")
    what = "trained weights" if job.trained else "untrained: built from the config, no weights"
    console.print(f"kiln inspect {job.source['path']} ({what}); {mode} mode, CPU, float32")
    console.print(
        f"batch: {len(x)} {opts['split']} examples, input {list(x.shape)} {x.dtype}".replace(
            "torch.", ""
        )
    )

    model.eval()
    summary = model_summary(model, x, max_depth=opts["depth"])
    console.print(summary.table())
    console.print(
        f"params {summary.total_params:,} (trainable {summary.trainable_params:,}, buffers "
        f"{summary.buffers:,}); MACs per batch of {len(x)}: {human(summary.total_macs)} "
        "(forward, FlopCounterMode, MACs = FLOPs / 2; elementwise ops count 0)"
    )

    model.train(mode == "train")
    loss_fn = build.loss_for(job.cfg, job.data)
    anomaly: dict[str, Any] = {"enabled": opts["anomaly"], "error": None}
    with no_inplace(model):
        guard_cm = (
            detect_anomaly(model, step=0, raise_error=False)
            if opts["anomaly"]
            else NonFiniteGuard(model, step=0, raise_error=False)
        )
        guard = None
        try:
            with guard_cm as guard:
                stats = layer_stats(model, x, lambda out: loss_fn(out, y), bins=opts["bins"])
        except AnomalyError as err:
            anomaly |= {"error": str(err), "operation": err.operation, "line": err.forward_line}
            with NonFiniteGuard(model, step=0, raise_error=False) as guard:
                stats = layer_stats(model, x, bins=opts["bins"])  # activations only
        finally:
            model.zero_grad(set_to_none=True)
    console.print(_stats_table(stats))
    if stats.loss is not None:
        console.print(f"loss of the batch: {stats.loss:.4g}")
    else:
        console.print("loss of the batch: - (the backward failed; see anomaly mode below)")
    report = guard.report if guard is not None else None
    if report is None:
        console.print("non-finite: none (every module output is finite)")
    else:
        console.print(f"non-finite: first in {report}")
    if anomaly["error"]:
        console.print(f"anomaly mode: {anomaly['error']}")
    elif opts["anomaly"]:
        console.print("anomaly mode: the backward pass is clean")

    job.out.mkdir(parents=True, exist_ok=True)
    files = _histograms(job.out, stats, console)
    result: dict[str, Any] = {
        "source": job.source,
        "mode": mode,
        "device": "cpu",
        "batch": {
            "split": opts["split"],
            "size": len(x),
            "input_shape": list(x.shape),
            "loss": stats.loss,
        },
        "summary": summary.to_dict(),
        "layers": stats.to_dict()["layers"],
        "nonfinite": report.to_dict() if report is not None else None,
        "anomaly": anomaly,
        "saliency": None,
    }
    if saliency:
        model.eval()
        result["saliency"] = _saliency(job, opts, model, saliency, method, layer)
        files += result["saliency"]["files"]
        console.print(
            f"saliency ({method}{f', layer {layer}' if method == 'gradcam' else ''}): "
            f"{len(result['saliency']['samples'])} {opts['split']} examples"
        )
    files.append("inspect.json")
    result["files"] = files
    (job.out / "inspect.json").write_text(json.dumps(json_safe(result), indent=1))
    console.print(f"wrote {job.out}: {', '.join(files)}")
    return result


def _histograms(out: Path, stats: StatsReport, console: Console) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        console.print("histograms skipped: pip install matplotlib to get the PNGs")
        return []
    from kiln.inspect.plots import histogram_grid

    files = []
    for kind, name in (("activation", "activations.png"), ("gradient", "gradients.png")):
        if any(getattr(layer, kind) is not None for layer in stats.layers):
            histogram_grid(stats.layers, out / name, kind=kind)  # type: ignore[arg-type]
            files.append(name)
    return files


def _saliency(
    job: _Job, opts: dict[str, Any], model: nn.Module, n: int, method: str, layer: str | None
) -> dict[str, Any]:
    import torch

    from kiln.inspect.plots import saliency_grid
    from kiln.inspect.saliency import resolve_targets, saliency

    x, y = _examples(job, opts["split"], n)
    with torch.no_grad():
        predicted = resolve_targets(model(x), None)
    options: dict[str, Any] = {}
    if method == "gradcam":
        options["layer"] = layer
    elif method == "smoothgrad":
        stdev = opts["noise"] * float(x.max() - x.min())
        options |= {
            "samples": opts["samples"],
            "stdev": stdev,
            "generator": torch.Generator().manual_seed(job.cfg.seed),
        }
    maps = saliency(model, x, method, predicted, **options)
    names = job.data.info.class_names
    samples, titles = [], []

    def show(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if v is None:
            return "-"
        return names[v] if names and 0 <= v < len(names) else str(v)

    for i in range(len(x)):
        label = y[i].item() if y[i].numel() == 1 else None
        pred = int(predicted[i])
        titles.append(f"#{i} label {show(label)}, predicted {show(pred)}")
        samples.append({"index": i, "label": label, "predicted": pred})
    files = []
    for k, start in enumerate(range(0, len(x), _PER_PAGE), start=1):
        name = f"saliency-{method}-{k}.png"
        page = slice(start, start + _PER_PAGE)
        saliency_grid(x[page], maps[page], job.out / name, method=method, titles=titles[page])
        files.append(name)
    return {
        "method": method,
        "layer": layer,
        "target": "predicted class",
        "options": {k: v for k, v in options.items() if k != "generator"},
        "samples": samples,
        "files": files,
    }

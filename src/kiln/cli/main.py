"""``kiln``: the console entry point. Verbs import torch lazily, so ``--help`` stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from kiln import __version__

app = typer.Typer(
    name="kiln",
    help="Advanced PyTorch techniques that work together, on your own model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="allow code that the files name: a model.target import path in the run's config, "
        "weights or checkpoint, and a .pt2 that unpickles on loading. Only for files you trust, "
        "e.g. your own run trained with model.target=pkg.module:Net",
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Kiln command line."""


@app.command()
def train(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="CONFIG.yaml then key.sub=value overrides", show_default=False),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="print the resolved config and exit")
    ] = False,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Train a model from a YAML config plus key.sub=value overrides."""
    from kiln.cli.errors import run_cli
    from kiln.cli.train import run_train

    run_cli(
        lambda: run_train(args or [], print_config=print_config, trust_code=trust_code),
        debug=debug,
    )


@app.command("eval")
def eval_(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="run directories (several = an ensemble), optionally followed by tta=flip,shift",
            show_default=False,
        ),
    ],
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    checkpoint: Annotated[
        str | None, typer.Option(help="evaluate this checkpoint (or 'last'/'best') instead")
    ] = None,
    tta: Annotated[
        str | None, typer.Option(help="test-time augmentation: flip, shift, noise (comma list)")
    ] = None,
    vote: Annotated[
        bool, typer.Option("--vote", help="ensemble by majority vote instead of mean probability")
    ] = False,
    snapshots: Annotated[
        int | None, typer.Option(help="snapshot ensemble of the run's last N checkpoints")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Metrics of trained runs on the held-out split: one run, an ensemble, with or without TTA."""
    from kiln.cli.errors import run_cli
    from kiln.cli.eval import run_eval

    run_cli(
        lambda: run_eval(
            runs,
            split=split,
            checkpoint=checkpoint,
            tta=tta,
            vote=vote,
            snapshots=snapshots,
            trust_code=trust_code,
        ),
        debug=debug,
    )


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def tune(
    what: Annotated[
        str, typer.Argument(help="lr (learning-rate range test) or batch (batch size)")
    ],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="CONFIG.yaml then key.sub=value overrides", show_default=False),
    ] = None,
    debug: Debug = False,
) -> None:
    """Find a learning rate (range test, plot) or the largest batch size that fits.

    Finder options: tune.steps, tune.start_lr, tune.end_lr, tune.smoothing (lr);
    tune.mode=power|binary, tune.budget_mb, tune.max_batch (batch).
    """
    from kiln.cli.errors import run_cli
    from kiln.cli.tune import run_tune

    run_cli(lambda: run_tune(what, args or []), debug=debug)


@app.command()
def consolidate(
    checkpoint: Annotated[str, typer.Argument(help="a run directory or a step-N.ckpt file")],
    out: Annotated[
        str | None, typer.Option(help="output .safetensors (default: next to the checkpoint)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Turn a checkpoint (FSDP2-sharded or not) into one .safetensors weights file."""
    from kiln.cli.errors import run_cli

    def go() -> None:
        from pathlib import Path

        from kiln.errors import UsageError
        from kiln.train.checkpoint import resolve_checkpoint
        from kiln.train.weights import consolidate_checkpoint

        path = resolve_checkpoint(checkpoint)
        target = Path(out) if out else path.with_suffix(".safetensors")
        if not target.parent.is_dir():
            raise UsageError(
                f"--out {target}: folder {target.parent} does not exist; create it or choose "
                "another --out"
            )
        weights = consolidate_checkpoint(path, out=target, trust_code=trust_code)
        print(f"{len(weights)} tensors from {path} -> {target}")

    run_cli(go, debug=debug)


@app.command()
def export(
    runs: Annotated[list[str], typer.Argument(help="run directory (several = one ensemble model)")],
    format: Annotated[
        str, typer.Option("--format", help="torchscript, exported, onnx or torchserve")
    ] = "exported",
    fuse: Annotated[
        bool, typer.Option("--fuse", help="fold conv-bn and linear chains first")
    ] = False,
    out: Annotated[
        str | None, typer.Option(help="output folder (default: RUN/export/FORMAT)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Export a trained run to TorchScript, torch.export (.pt2) or ONNX, with a parity check."""
    from kiln.cli.errors import run_cli
    from kiln.cli.export import run_export

    run_cli(
        lambda: run_export(runs, format=format, fuse=fuse, out=out, trust_code=trust_code),
        debug=debug,
    )


@app.command()
def serve(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="run directory (several = one ensemble), or an exported .pt2 / .onnx / "
            "TorchScript .ts"
        ),
    ],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port)")] = 8000,
    max_batch: Annotated[int, typer.Option(help="most requests per forward pass")] = 32,
    max_delay_ms: Annotated[
        float, typer.Option(help="longest wait for a fuller batch (0 = take what is queued)")
    ] = 0.0,
    queue_size: Annotated[int, typer.Option(help="bounded queue; 503 when full")] = 1024,
    timeout_s: Annotated[float, typer.Option(help="per-request timeout")] = 10.0,
    workers: Annotated[int, typer.Option(help="server processes sharing the port")] = 1,
    tta: Annotated[
        str | None, typer.Option(help="test-time augmentation: flip, vflip, shift, noise")
    ] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the eager model")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch intra-op threads per process (1 suits small models on busy hosts)"
        ),
    ] = None,
    batcher: Annotated[
        str, typer.Option(help="loop (batches on the event loop; default) or thread")
    ] = "loop",
    max_body_mb: Annotated[
        float, typer.Option(help="largest request body in MiB (413 beyond)")
    ] = 1.0,
    max_connections: Annotated[
        int, typer.Option(help="open connections at most (the oldest idle one is closed)")
    ] = 1024,
    header_timeout_s: Annotated[
        float, typer.Option(help="time to send a request's headers (408 after)")
    ] = 10.0,
    body_timeout_s: Annotated[
        float, typer.Option(help="time to send a request's body after its headers (408 after)")
    ] = 30.0,
    idle_timeout_s: Annotated[
        float, typer.Option(help="an idle keep-alive connection is closed after this")
    ] = 30.0,
    reuse_port: Annotated[bool, typer.Option(hidden=True)] = False,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Serve a trained run over HTTP with dynamic batching (/predict, /health, /ready, /metrics)."""
    from kiln.cli.errors import run_cli
    from kiln.cli.serve import run_serve

    run_cli(
        lambda: run_serve(
            targets,
            host=host,
            port=port,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            queue_size=queue_size,
            timeout_s=timeout_s,
            workers=workers,
            tta=tta,
            compile=compile,
            reuse_port=reuse_port,
            threads=threads,
            batcher=batcher,
            max_body_mb=max_body_mb,
            max_connections=max_connections,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
            idle_timeout_s=idle_timeout_s,
            trust_code=trust_code,
        ),
        debug=debug,
    )


@app.command()
def quantize(
    run: Annotated[str, typer.Argument(help="run directory (its model.safetensors)")],
    method: Annotated[
        str, typer.Option(help="dynamic, static, qat, pt2e or onnx-int8")
    ] = "dynamic",
    calib_batches: Annotated[int, typer.Option(help="training batches for calibration")] = 32,
    qat_epochs: Annotated[int, typer.Option(help="fine-tuning epochs for qat")] = 2,
    out: Annotated[
        str | None, typer.Option(help="output folder (default: RUN/quantized/METHOD)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Quantize a trained run to int8 and print size, latency and accuracy against fp32."""
    from kiln.cli.errors import run_cli
    from kiln.cli.quantize import run_quantize

    run_cli(
        lambda: run_quantize(
            run,
            method=method,
            calib_batches=calib_batches,
            qat_epochs=qat_epochs,
            out=out,
            trust_code=trust_code,
        ),
        debug=debug,
    )


@app.command()
def prune(
    run: Annotated[str, typer.Argument(help="run directory (its model.safetensors)")],
    amount: Annotated[float, typer.Option(help="fraction to remove, in [0, 1)")] = 0.5,
    structured: Annotated[
        bool, typer.Option("--structured", help="remove whole channels/neurons (smaller layers)")
    ] = False,
    iterative: Annotated[int, typer.Option(help="prune + fine-tune cycles")] = 1,
    method: Annotated[str, typer.Option(help="l1 or random")] = "l1",
    scope: Annotated[str, typer.Option(help="layer (per layer) or global magnitude")] = "layer",
    finetune_epochs: Annotated[int, typer.Option(help="fine-tuning epochs per cycle")] = 1,
    rewind: Annotated[
        bool, typer.Option("--rewind", help="lottery ticket: rewind survivors to initial weights")
    ] = False,
    out: Annotated[str | None, typer.Option(help="output folder (default: RUN/pruned)")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Prune a trained run (unstructured or structured), fine-tune, report size/speed/accuracy."""
    from kiln.cli.errors import run_cli
    from kiln.cli.prune import run_prune

    run_cli(
        lambda: run_prune(
            run,
            amount=amount,
            structured=structured,
            iterative=iterative,
            method=method,
            scope=scope,
            finetune_epochs=finetune_epochs,
            rewind=rewind,
            out=out,
            trust_code=trust_code,
        ),
        debug=debug,
    )


_ARGS_HELP = "RUN directory or CONFIG.yaml, then key.sub=value overrides"
_EXTRA = {"ignore_unknown_options": True, "allow_extra_args": True}


@app.command(context_settings=_EXTRA)
def inspect(
    args: Annotated[list[str], typer.Argument(help=_ARGS_HELP, show_default=False)],
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
    from kiln.cli.inspect import run_inspect

    run_cli(
        lambda: run_inspect(args, saliency=saliency, method=method, out=out, trust_code=trust_code),
        debug=debug,
    )


@app.command(context_settings=_EXTRA)
def profile(
    args: Annotated[list[str], typer.Argument(help=_ARGS_HELP, show_default=False)],
    bottleneck: Annotated[
        bool, typer.Option("--bottleneck", help="where the time goes: data/fwd/bwd/optim/syncs")
    ] = False,
    steps: Annotated[int, typer.Option(help="active profiled steps")] = 5,
    out: Annotated[str | None, typer.Option(help="folder for the trace and tables")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """torch.profiler over a few training steps: trace, top ops by time and memory."""
    from kiln.cli.errors import run_cli
    from kiln.cli.profile import run_profile

    run_cli(
        lambda: run_profile(
            args, bottleneck=bottleneck, steps=steps, out=out, trust_code=trust_code
        ),
        debug=debug,
    )


@app.command(context_settings=_EXTRA)
def doctor(
    args: Annotated[list[str], typer.Argument(help=_ARGS_HELP, show_default=False)],
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Find common training mistakes: what, where, why it matters, how to fix, measured cost."""
    from kiln.cli.doctor import run_doctor
    from kiln.cli.errors import run_cli

    run_cli(lambda: run_doctor(args, trust_code=trust_code), debug=debug)


@app.command(context_settings=_EXTRA)
def bench(
    args: Annotated[list[str], typer.Argument(help=_ARGS_HELP, show_default=False)],
    apply: Annotated[
        bool, typer.Option("--apply", help="write the fastest config within accuracy tolerance")
    ] = False,
    repeats: Annotated[int, typer.Option(help="repeats per variant (median)")] = 3,
    out: Annotated[str | None, typer.Option(help="folder for the table and JSON")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Technique ablation: time, memory and accuracy of one change at a time vs a baseline."""
    from kiln.cli.bench import run_bench
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_bench(args, apply=apply, repeats=repeats, out=out, trust_code=trust_code),
        debug=debug,
    )


@app.command()
def env() -> None:
    """Versions, threads and devices: what a bug report needs."""
    from kiln.cli.env import print_env

    print_env()


def main() -> None:
    app()

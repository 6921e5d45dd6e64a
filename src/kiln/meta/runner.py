"""``kiln train`` with ``meta.enabled=true``: meta-train, pretrain a baseline, compare both.

The job (Finn et al. 2017, section 5.1, sine-wave regression):

1. **Meta-train** the configured model with MAML (``meta.method=maml``, second order) or FOMAML
   (``fomaml``) for ``meta.meta_steps`` updates of ``meta.meta_batch`` tasks each, the
   configured optimizer (``optim.*``) stepping on the meta-gradient.
2. **Pretrain a baseline** from the same initial weights with the same optimizer, number of
   updates and tasks per update, by plain regression on all examples of those tasks pooled.
3. **Evaluate** both on ``meta.eval_tasks`` held-out tasks: adapt on ``meta.shots`` support
   examples with ``k`` plain gradient steps of ``meta.inner_lr`` for each ``k`` in
   ``meta.eval_inner_steps`` (and 0, no adaptation), and report the MSE on 100 query points per
   task (mean and 95% confidence half-width over tasks).

Task draws come from seeded ``torch.Generator`` objects (training: ``seed``; held-out tasks: a
fixed seed, so every run and seed is scored on the same tasks); ``seed`` also seeds the model's
initialisation. The run directory holds ``config.yaml``, ``metrics.jsonl`` (and ``tb/``),
``summary.json`` (the table) and the weights of both models (``maml.safetensors``,
``baseline.safetensors``, readable with ``safetensors.torch.load_model``). On the CPU the loop
runs on one intra-op thread unless ``OMP_NUM_THREADS`` is set (see :func:`_cpu_threads`).

Example:
    >>> from kiln.config import load_config
    >>> cfg = load_config("configs/maml_sine.yaml", ["meta.meta_steps=20"])  # doctest: +SKIP
    >>> summary = run_meta(cfg)                                               # doctest: +SKIP
    >>> [row["inner_steps"] for row in summary["table"]]                      # doctest: +SKIP
    [0, 1, 10]
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kiln.config import Config, MetaConfig, dump_config
from kiln.data.base import DataInfo
from kiln.meta.baseline import TaskSampler, pretrain_joint
from kiln.meta.maml import adaptation_losses, check_functional, meta_gradient, params_of
from kiln.meta.tasks import SineTasks
from kiln.run import CONFIG, SUMMARY
from kiln.train.build import new_run_dir
from kiln.train.checkpoint.weights import save_weights
from kiln.train.engine import select_device
from kiln.train.logging import MetricsLogger, Progress
from kiln.train.optim import build_optimizer
from kiln.train.reproducibility import seed_everything

__all__ = [
    "EVAL_QUERY",
    "EVAL_SEED",
    "check_meta_config",
    "evaluate_both",
    "format_table",
    "meta_train",
    "run_meta",
]

EVAL_QUERY = 100
"""Query points per held-out task: the reported MSE averages over ``eval_tasks x EVAL_QUERY``."""

EVAL_SEED = 20_170_703
"""Seed of the held-out tasks, fixed so runs with different seeds are scored on the same tasks."""

_TASKS: dict[str, SineTasks] = {"sine": SineTasks()}


def check_meta_config(cfg: Config) -> None:
    """Refuse settings the meta loop does not honour, each with the fix.

    Raises:
        ValueError: mixed precision, compile, resume, a scheduler, several processes, or an
            empty or negative ``meta.eval_inner_steps``.

    Example:
        >>> from kiln.config import load_config
        >>> check_meta_config(load_config(None, ["meta.enabled=true", "precision=fp32"]))
        >>> check_meta_config(load_config(None, ["meta.enabled=true", "precision=bf16"]))
        Traceback (most recent call last):
        ...
        ValueError: meta-learning runs in fp32 (got precision=bf16); set precision=fp32
    """
    if cfg.precision != "fp32":
        raise ValueError(
            f"meta-learning runs in fp32 (got precision={cfg.precision}); set precision=fp32"
        )
    refused = [  # (is it set, the setting, the fix)
        (cfg.compile, "compile=true", "compile=false"),
        (cfg.resume is not None, f"resume={cfg.resume}", "resume=null"),
        (
            cfg.scheduler.name != "none",
            f"scheduler.name={cfg.scheduler.name}",
            "scheduler.name=none",
        ),
    ]
    for on, setting, fix in refused:
        if on:
            raise ValueError(f"meta-learning does not support {setting}; remove it or set {fix}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("meta-learning runs in one process; launch `kiln train` without torchrun")
    steps = cfg.meta.eval_inner_steps
    if not steps or min(steps) < 0:
        raise ValueError(
            f"meta.eval_inner_steps must list inner-step counts >= 0, got {steps}; "
            "e.g. meta.eval_inner_steps=[1,10]"
        )


def meta_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sample: TaskSampler,
    meta: MetaConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    logger: MetricsLogger | None = None,
    log_every: int = 50,
    progress: Progress | None = None,
) -> float:
    """The meta-training loop: one meta-gradient and one optimizer step per meta-batch.

    Args:
        model: the network whose parameters are the meta-learned initialisation (in place).
        optimizer: the meta-optimizer over ``model.parameters()``.
        sample: the task sampler (e.g. ``SineTasks().sample``).
        meta: shots, query, inner steps and LR, meta-batch, meta-steps, method.
        generator: the generator every task draw comes from.
        device: where the tasks go (the model's device).
        logger: receives ``meta/query_loss`` (mean over the last ``log_every`` steps).
        log_every: steps between logged losses (each log reads the loss from the device).
        progress: a progress bar to advance.

    Returns:
        The mean query loss (after adaptation) over the last logged window.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from kiln.config import MetaConfig
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> loss = meta_train(net, opt, SineTasks().sample, MetaConfig(meta_steps=3),
        ...                   generator=torch.Generator(), device=torch.device("cpu"))
        >>> loss > 0
        True
    """
    first_order = meta.method == "fomaml"
    window, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    last = float("nan")
    for step in range(1, meta.meta_steps + 1):
        tasks = sample(meta.meta_batch, shots=meta.shots, query=meta.query, generator=generator)
        grads, loss = meta_gradient(
            model,
            params_of(model),
            tasks.to(device),
            steps=meta.inner_steps,
            lr=meta.inner_lr,
            first_order=first_order,
        )
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        window += loss
        count += 1
        if step % log_every == 0 or step == meta.meta_steps:
            last = (window / count).item()
            window, count = torch.zeros((), device=device), 0
            if logger is not None:
                logger.log({"meta/query_loss": last}, step=step)
            if progress is not None:
                progress.update(step, {"query loss": last})
    return last


def run_meta(cfg: Config, *, verbose: bool = True) -> dict[str, Any]:
    """Run the meta-learning job ``cfg`` describes; write the run directory; return the summary.

    Args:
        cfg: a config with ``meta.enabled=true`` (see ``configs/maml_sine.yaml``).
        verbose: print the comparison table and the run directory.

    Returns:
        The content of ``summary.json``: the settings, ``table`` (one row per inner-step count
        with ``maml_mse``, ``maml_ci95``, ``baseline_mse``, ``baseline_ci95``), ``seconds``
        and ``run_dir``.

    Raises:
        ValueError: a setting the meta loop does not support (see :func:`check_meta_config`),
            or a model that cannot run per task (see :func:`kiln.meta.maml.check_functional`).
    """
    check_meta_config(cfg)
    m = cfg.meta
    seed_everything(cfg.seed)  # the model's initialisation; task draws use their own generators
    device = select_device(cfg.device)
    sample = _TASKS[m.task].sample
    info = DataInfo("regression", (1,), num_outputs=1, extra={"meta_task": m.task})

    from kiln.registry import build_model

    model = build_model(cfg.model, info)
    check_functional(model)
    baseline = copy.deepcopy(model)  # the same initial weights for both
    model.to(device)
    baseline.to(device)

    run_dir = new_run_dir(cfg.out_dir, cfg.name)
    (run_dir / CONFIG).write_text(dump_config(cfg))
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard)
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        threads = stack.enter_context(_cpu_threads(device))
        stack.callback(logger.close)
        start = time.perf_counter()
        with Progress(m.meta_steps, enabled=cfg.log.progress) as bar:
            meta_train(
                model,
                build_optimizer(model, cfg.optim),
                sample,
                m,
                generator=torch.Generator().manual_seed(cfg.seed),
                device=device,
                logger=logger,
                log_every=cfg.train.log_every,
                progress=bar,
            )
        seconds["meta_train"] = time.perf_counter() - start

        start = time.perf_counter()

        def log_baseline(step: int, loss: torch.Tensor) -> None:
            if step % cfg.train.log_every == 0:
                logger.log({"baseline/loss": loss.item()}, step=step)

        pretrain_joint(
            baseline,
            build_optimizer(baseline, cfg.optim),
            sample,
            steps=m.meta_steps,
            tasks_per_step=m.meta_batch,
            shots=m.shots,
            query=m.query,
            generator=torch.Generator().manual_seed(cfg.seed),
            device=device,
            log=log_baseline,
        )
        seconds["baseline_pretrain"] = time.perf_counter() - start

        start = time.perf_counter()
        table = evaluate_both(model, baseline, cfg, device)
        seconds["evaluate"] = time.perf_counter() - start
        for row in table:
            k = row["inner_steps"]
            logger.log(
                {
                    f"eval/maml_mse@{k}": row["maml_mse"],
                    f"eval/baseline_mse@{k}": row["baseline_mse"],
                },
                step=m.meta_steps,
            )

    save_weights(model, run_dir / "maml.safetensors", cfg, info)
    save_weights(baseline, run_dir / "baseline.safetensors", cfg, info)
    summary: dict[str, Any] = {
        "task": m.task,
        "method": m.method,
        "meta_steps": m.meta_steps,
        "meta_batch": m.meta_batch,
        "shots": m.shots,
        "query": m.query,
        "inner_steps": m.inner_steps,
        "inner_lr": m.inner_lr,
        "eval_tasks": m.eval_tasks,
        "eval_query": EVAL_QUERY,
        "table": table,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "torch_threads": threads,
        "run_dir": str(run_dir),
    }
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    if verbose:
        print(format_table(summary))
        print(f"run directory: {run_dir}")
    return summary


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[int]:
    """One intra-op thread on the CPU unless ``OMP_NUM_THREADS`` says otherwise; restored after.

    A meta-step is hundreds of tiny ops (25 tasks x 10 points x 40 units); splitting them over
    threads only adds synchronisation. On a shared two-core machine one meta-step of the shipped
    config took 4.4 ms of CPU with one thread and 86 ms with two (the threads wait for each
    other at every op), so the loop is pinned to one thread unless the user chose a count.
    """
    before = torch.get_num_threads()
    wanted = before if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ else 1
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def evaluate_both(
    model: nn.Module, baseline: nn.Module, cfg: Config, device: torch.device
) -> list[dict[str, Any]]:
    """Post-adaptation query MSE of both models on the held-out tasks, one row per step count.

    Example:
        >>> from torch import nn
        >>> from kiln.config import load_config
        >>> cfg = load_config(None, ["meta.eval_tasks=10", "meta.eval_inner_steps=[1]"])
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> rows = evaluate_both(net, net, cfg, torch.device("cpu"))
        >>> [r["inner_steps"] for r in rows], rows[0]["maml_mse"] == rows[0]["baseline_mse"]
        ([0, 1], True)
    """
    m = cfg.meta
    gen = torch.Generator().manual_seed(EVAL_SEED)
    tasks = _TASKS[m.task].sample(m.eval_tasks, shots=m.shots, query=EVAL_QUERY, generator=gen)
    tasks = tasks.to(device)
    steps = sorted({0, *m.eval_inner_steps})
    scores = {}
    for label, net in (("maml", model), ("baseline", baseline)):
        losses = adaptation_losses(net, params_of(net), tasks, steps=steps, lr=m.inner_lr)
        mean = losses.mean(dim=1)
        half = (
            1.96 * losses.std(dim=1) / math.sqrt(losses.shape[1])
            if m.eval_tasks > 1
            else torch.zeros_like(mean)
        )
        scores[label] = (mean.tolist(), half.tolist())
    return [
        {
            "inner_steps": k,
            "maml_mse": scores["maml"][0][i],
            "maml_ci95": scores["maml"][1][i],
            "baseline_mse": scores["baseline"][0][i],
            "baseline_ci95": scores["baseline"][1][i],
        }
        for i, k in enumerate(steps)
    ]


def format_table(summary: dict[str, Any]) -> str:
    """The comparison as plain text, one row per inner-step count.

    Example:
        >>> row = {"inner_steps": 1, "maml_mse": 0.5, "maml_ci95": 0.05,
        ...        "baseline_mse": 3.0, "baseline_ci95": 0.2}
        >>> s = {"method": "maml", "eval_tasks": 600, "shots": 10, "inner_lr": 0.01,
        ...      "meta_steps": 10, "table": [row]}
        >>> print(format_table(s).splitlines()[-1])
                  1    0.500 ± 0.050           3.000 ± 0.200
    """
    name = summary["method"].upper()
    lines = [
        f"post-adaptation MSE on {summary['eval_tasks']} held-out tasks "
        f"(K={summary['shots']}, inner lr {summary['inner_lr']}, "
        f"{summary['meta_steps']} meta-steps; mean ± 95% CI)",
        f"{'inner steps':>11}  {name:>15}  {'pretrained baseline':>22}",
    ]
    for row in summary["table"]:
        maml = f"{row['maml_mse']:.3f} ± {row['maml_ci95']:.3f}"
        base = f"{row['baseline_mse']:.3f} ± {row['baseline_ci95']:.3f}"
        lines.append(f"{row['inner_steps']:>11}  {maml:>15}  {base:>22}")
    return "\n".join(lines)

"""``kiln eval RUN``: metrics of a trained run on its held-out split, with a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_eval(run: str, *, split: str = "test", checkpoint: str | None = None) -> dict[str, Any]:
    import torch

    from kiln.config import load_config
    from kiln.losses import build_loss
    from kiln.train import build
    from kiln.train.checkpoint import resolve_checkpoint
    from kiln.train.engine import Engine
    from kiln.train.metrics import TaskMetrics, confusion_matrix
    from kiln.train.trainer import evaluate
    from kiln.train.weights import load_model

    run_dir = Path(run)
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"not a Kiln run directory (no config.yaml): {run_dir}")
    if split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {split!r}")
    cfg = load_config(run_dir / "config.yaml")
    data = build.build_data_for(cfg)
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise ValueError(f"this run has no {split} split (data.{split}_fraction=0)")
    engine = Engine(device=cfg.device, precision=cfg.precision, allow_fp16_cpu=cfg.allow_fp16_cpu)
    if checkpoint:
        ckpt_path = resolve_checkpoint(
            run_dir / "checkpoints" / checkpoint if checkpoint in ("last", "best") else checkpoint
        )
        from kiln.train.weights import consolidate_checkpoint

        model = build.build_model_for(cfg, data.info)
        model.load_state_dict(consolidate_checkpoint(ckpt_path))  # sharded (FSDP2) or not
    else:
        model = load_model(run_dir)
    model, _ = engine.setup(model)
    loader = build.loader_for(cfg, dataset, train=False, device=engine.device)
    loss_fn = build_loss(cfg.loss, task=data.info.task)
    metrics = TaskMetrics(
        data.info.task,
        num_classes=data.info.num_classes,
        device=engine.device,
        top_k=cfg.train.top_k,
    )
    result: dict[str, Any] = dict(evaluate(model, loader, loss_fn, engine, metrics))
    _print_metrics(result, split, len(dataset))  # type: ignore[arg-type]
    if data.info.task == "classification" and data.info.num_classes:
        preds, targets = [], []
        with torch.inference_mode():
            for batch in loader:
                x, y = engine.to_device(batch)
                with engine.autocast():
                    preds.append(model(x).argmax(-1).cpu())
                targets.append(y.cpu())
        cm = confusion_matrix(torch.cat(preds), torch.cat(targets), data.info.num_classes)
        names = data.info.class_names or [str(i) for i in range(data.info.num_classes)]
        _print_confusion(cm, names)
        result["confusion_matrix"] = cm.tolist()
    (run_dir / f"eval-{split}.json").write_text(json.dumps(result, indent=1))
    return result


def _print_metrics(metrics: dict[str, Any], split: str, n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{split} split ({n} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)


def _print_confusion(cm: Any, names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for i, row in enumerate(cm.tolist()):
        table.add_row(
            names[i], *[f"[bold]{v}[/bold]" if j == i else str(v) for j, v in enumerate(row)]
        )
    Console().print(table)

"""The loops that benchmarks/loop_overhead.py times: data, models, each loop and one measurement.

See loop_overhead.py for what each loop is and which baseline each ratio uses.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

LOOPS = (
    "raw",
    "raw_gather",
    "raw_fused",
    "kiln",
    "fit_tensor",
    "engine",
    "lightning",
    "lightning_fused",
)
EXTRA_LOOPS = ("kiln_unguarded",)  # diagnostics, only when named in --loops
LIGHTNING = ("lightning", "lightning_fused")
BASELINES = ("raw", "raw_fused")
TARGETS = {"kiln": 1.03, "fit_tensor": 1.03, "engine": 1.02}  # against raw_fused
CASES = ("mlp", "linear")
DEFAULT_EPOCHS = {"mlp": 60, "linear": 120}
LR, MOMENTUM, BATCH = 0.05, 0.9, 64
LIGHTNING_HINT = (
    "python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && "
    ".venv-bench/bin/pip install -c benchmarks/requirements-lightning.txt "
    "-r benchmarks/requirements-lightning.txt -e ."
)


# ---------------------------------------------------------------------------- data and models


def make_digits(path: Path) -> None:
    """Digits 8x8 as (1797, 64) float32 in [0, 1], standardised per pixel; saved for workers.

    Same recipe as Kiln's ``layout=flat`` digits (population std, constant pixels only centred),
    with all rows as training rows since this benchmark has no held-out split.
    """
    import torch
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float64).reshape(-1, 64) / 16.0
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    x = ((x - mean) / std).to(torch.float32).contiguous()
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    torch.save({"x": x, "y": y}, path)


def build_model(case: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)  # the same initial weights in every loop
    if case == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if case == "linear":
        return nn.Linear(64, 10)
    raise ValueError(f"unknown case {case!r}; allowed: {', '.join(CASES)}")


class Clock:
    """Reads the clock after update ``start`` (end of the warm-up epoch) and after the last one."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total
        self.t0 = self.t1 = 0.0

    def tick(self, step: int) -> None:
        if step == self.start:
            self.t0 = time.perf_counter()
        elif step == self.total:
            self.t1 = time.perf_counter()

    def us_per_step(self) -> float:
        return (self.t1 - self.t0) / (self.total - self.start) * 1e6


# ---------------------------------------------------------------------------- the loops


class GatherLoader:
    """One index op per batch over a fresh permutation each epoch: the ``raw_fused`` data path."""

    def __init__(self, x: Any, y: Any) -> None:
        import torch

        self.x, self.y = x, y
        self.g = torch.Generator()
        self.g.manual_seed(0)

    def __len__(self) -> int:
        return -(-len(self.x) // BATCH)

    def __iter__(self) -> Any:
        import torch

        n, x, y = len(self.x), self.x, self.y
        perm = torch.randperm(n, generator=self.g)
        for s in range(0, n, BATCH):
            idx = perm[s : s + BATCH]
            yield x[idx], y[idx]


def run_raw(model: Any, x: Any, y: Any, epochs: int, clock: Clock, loop: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    fused = {"fused": True} if loop == "raw_fused" else {}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, **fused)
    model.train()
    step = 0
    # raw: the guides' per-sample DataLoader; raw_gather/raw_fused: one index op per batch.
    if loop == "raw":
        loader: Any = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    else:
        loader = GatherLoader(x, y)
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            clock.tick(step)


def run_engine(model: Any, x: Any, y: Any, epochs: int, clock: Clock) -> Any:
    """``kiln.Engine`` in a user's loop, on the ``raw_fused`` data path and optimizer."""
    import torch
    import torch.nn.functional as F

    import kiln

    engine = kiln.Engine(device="cpu")
    model, _ = engine.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, fused=True)
    model.train()
    loader = GatherLoader(x, y)
    n = len(loader)
    step = 0
    for _ in range(epochs):
        for i, batch in enumerate(loader):
            xb, yb = engine.to_device(batch)
            with engine.micro_step(i, n) as update:
                with engine.autocast():
                    loss = F.cross_entropy(model(xb), yb)
                engine.backward(loss)
            if update:
                engine.optimizer_step(opt)
                step += 1
                clock.tick(step)
    return engine.model


def kiln_overrides(out_dir: str, epochs: int, guard: bool = True) -> list[str]:
    """The Trainer's settings: nothing but the loop in the timed region (the guard stays on)."""
    return [
        f"out_dir={out_dir}",
        "name=loop_overhead",
        "seed=0",
        "device=cpu",
        "precision=fp32",
        "optim.name=sgd",
        f"optim.lr={LR}",
        f"optim.momentum={MOMENTUM}",
        "optim.weight_decay=0",
        "scheduler.name=none",
        f"data.batch_size={BATCH}",
        "data.val_fraction=0",
        "data.test_fraction=0",
        f"train.epochs={epochs}",
        "train.log_every=100000000",
        "checkpoint.every_epoch=false",
        "log.tensorboard=false",
        "log.progress=false",
        # the default guard, named: the targets hold with it on
        f"train.nonfinite={'stop' if guard else 'ignore'}",
    ]


class KilnTimer:
    """Reads the clock at the update that ends the warm-up epoch and at the last one."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_update_end(self, trainer: Any, step: int) -> None:
        self.clock.tick(step)


def run_fit_tensor(model: Any, x: Any, y: Any, epochs: int, clock: Clock, out_dir: str) -> Any:
    """``kiln.fit`` on the user's own ``TensorDataset`` (no val/test split: all rows train)."""
    from torch.utils.data import TensorDataset

    import kiln

    result = kiln.fit(
        model=model,
        data=TensorDataset(x, y),
        overrides=kiln_overrides(out_dir, epochs),
        callbacks=[KilnTimer(clock)],
        verbose=False,
    )
    del result
    return model


def run_kiln(
    model: Any, x: Any, y: Any, epochs: int, clock: Clock, out_dir: str, guard: bool = True
) -> Any:
    from kiln.config import load_config
    from kiln.data.base import ArrayDataset, DataBundle, DataInfo
    from kiln.train.trainer import Trainer

    cfg = load_config(None, kiln_overrides(out_dir, epochs, guard))
    info = DataInfo("classification", (64,), num_classes=10)
    bundle = DataBundle(ArrayDataset(x, y), None, None, info)
    trainer = Trainer(cfg, model=model, data=bundle, callbacks=[KilnTimer(clock)], verbose=False)
    trainer.fit()
    return trainer.engine.model


def run_lightning(model: Any, x: Any, y: Any, epochs: int, clock: Clock, loop: str) -> None:
    import logging
    import warnings

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")  # "does not have many workers" etc.: advice, not results
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Module(L.LightningModule):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, **fused)

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            clock.tick(trainer.global_step)

    fused = {"fused": True} if loop == "lightning_fused" else {}
    loader: Any = (
        GatherLoader(x, y)
        if loop == "lightning_fused"
        else DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        callbacks=[Timer()],
    )
    trainer.fit(Module(model), train_dataloaders=loader)


def measure(loop: str, case: str, epochs: int, data: Path, threads: int) -> dict[str, Any]:
    """One measurement (normally in its own pinned process)."""
    import torch

    torch.set_num_threads(threads)
    blob = torch.load(data, weights_only=True)
    x, y = blob["x"], blob["y"]
    steps_per_epoch = -(-len(x) // BATCH)
    clock = Clock(steps_per_epoch, steps_per_epoch * epochs)
    model = runner(loop, case, x, y, epochs)(clock)
    if not clock.t1:
        raise RuntimeError(f"{loop}: the last update ({clock.total}) was never reached")
    model.eval()
    with torch.inference_mode():
        final_loss = float(torch.nn.functional.cross_entropy(model(x), y))
    return {
        "loop": loop,
        "case": case,
        "us_per_step": clock.us_per_step(),
        "steps_timed": clock.total - clock.start,
        "final_loss": final_loss,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def runner(loop: str, case: str, x: Any, y: Any, epochs: int) -> Any:
    """A function of a clock that runs ``loop`` on ``case`` and returns the trained model."""

    def run(clock: Any) -> Any:
        model = build_model(case)
        if loop in ("kiln", "fit_tensor", "kiln_unguarded"):
            with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
                if loop == "fit_tensor":
                    return run_fit_tensor(model, x, y, epochs, clock, tmp)
                return run_kiln(model, x, y, epochs, clock, tmp, guard=loop == "kiln")
        if loop == "engine":
            return run_engine(model, x, y, epochs, clock)
        if loop in LIGHTNING:
            run_lightning(model, x, y, epochs, clock, loop)
        elif loop in ("raw", "raw_gather", "raw_fused"):
            run_raw(model, x, y, epochs, clock, loop)
        else:
            raise ValueError(f"unknown loop {loop!r}; allowed: {', '.join(LOOPS + EXTRA_LOOPS)}")
        return model

    return run


def measure_sliced(
    loops: list[str], case: str, epochs: int, data: Path, threads: int, clock: str = "cpu"
) -> list[dict[str, Any]]:
    """Every loop in this process, taking turns one epoch at a time (``_slices``).

    ``clock``: ``cpu`` (the loop thread's CPU time) or ``wall``.
    """
    import torch
    from _slices import run_sliced

    torch.set_num_threads(threads)
    blob = torch.load(data, weights_only=True)
    x, y = blob["x"], blob["y"]
    per_epoch = -(-len(x) // BATCH)
    runners = {lp: runner(lp, case, x, y, epochs) for lp in loops}
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    times, models = run_sliced(runners, per_slice=per_epoch, total=per_epoch * epochs, clock=timer)
    out = []
    for lp in loops:
        model = models[lp].eval()
        with torch.inference_mode():
            final_loss = float(torch.nn.functional.cross_entropy(model(x), y))
        out.append(
            {
                "loop": lp,
                "case": case,
                "rounds": times[lp],
                "steps_timed": per_epoch * (epochs - 1),
                "final_loss": final_loss,
            }
        )
    return out

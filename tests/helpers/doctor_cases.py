"""One small buggy training loop per mistake the doctor finds (the clean loop has none).

Each fixture is a hand-written loop with exactly one mistake, the code it must produce and the
places (module names or ``file:line`` of the offending call) its finding must point at.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from training import plain_step

from kiln.doctor import Finding, check
from kiln.doctor.sites import short_path


def site(fn: Callable[..., Any], text: str) -> str:
    """``file:line`` of the first line of ``fn``'s source that contains ``text``."""
    fn = inspect.unwrap(fn)
    lines, start = inspect.getsourcelines(fn)
    hit = next(i for i, line in enumerate(lines) if text in line)
    return f"{short_path(inspect.getsourcefile(fn) or '')}:{start + hit}"


def data(n: int = 48, batch_size: int = 8, **kwargs: Any) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, **kwargs)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)
    )


@dataclass
class Case:
    """A loop for :func:`check`, the finding it must produce and where it must point."""

    model: nn.Module
    loader: Any
    step: Callable[[Any], Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    where: list[str] = field(default_factory=list)

    def run(self) -> list[Finding]:
        return check(self.model, self.loader, self.step, **self.kwargs)


def good_eval(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    @torch.inference_mode()
    def evaluate(batch: Any) -> torch.Tensor:
        model.eval()
        try:
            return F.cross_entropy(model(batch[0]), batch[1])
        finally:
            model.train()

    return evaluate


# ---------------------------------------------------------------------- the loops


@pytest.fixture
def clean() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = torch.zeros(())

    def step(batch: Any) -> None:
        nonlocal total
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.detach()

    return Case(model, data(), step, {"optimizer": opt, "eval_fn": good_eval(model)})


@pytest.fixture
def eval_mode_in_train() -> Case:
    model = net()
    model.eval()  # left over from an evaluation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = plain_step(model, opt)
    where = ["1 (BatchNorm1d)", "3 (Dropout)", site(step, "model(x)")]
    return Case(model, data(), step, {"optimizer": opt}, "eval-mode-in-train", where)


@pytest.fixture
def train_mode_in_eval() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.inference_mode()
    def evaluate(batch: Any) -> torch.Tensor:
        return model(batch[0])  # no model.eval()

    kwargs = {"optimizer": opt, "eval_fn": evaluate}
    where = ["1 (BatchNorm1d)", "3 (Dropout)", site(evaluate, "model(batch[0])")]
    return Case(model, data(), plain_step(model, opt), kwargs, "train-mode-in-eval", where)


@pytest.fixture
def grad_in_eval() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def evaluate(batch: Any) -> torch.Tensor:
        model.eval()
        out = model(batch[0])  # autograd records all of it
        model.train()
        return out

    kwargs = {"optimizer": opt, "eval_fn": evaluate}
    where = [site(evaluate, "out = model(batch[0])")]
    return Case(model, data(), plain_step(model, opt), kwargs, "grad-in-eval", where)


@pytest.fixture
def missing_zero_grad() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(batch: Any) -> None:
        x, y = batch
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return Case(model, data(), step, {}, "missing-zero-grad", [site(step, "opt.step()")])


@pytest.fixture
def losses_appended() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses: list[torch.Tensor] = []

    def step(batch: Any) -> None:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss)

    where = [site(step, "losses.append(loss)")]
    return Case(model, data(), step, {"optimizer": opt}, "graph-kept", where)


@pytest.fixture
def loss_summed() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = torch.zeros(())

    def step(batch: Any) -> None:
        nonlocal total
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        total += loss

    where = [site(step, "total += loss")]
    return Case(model, data(), step, {"optimizer": opt}, "graph-kept", where)


@pytest.fixture
def item_in_step() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history: list[float] = []

    def step(batch: Any) -> None:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(loss.item())

    where = [site(step, "loss.item()")]
    return Case(model, data(), step, {"optimizer": opt}, "host-sync", where)


@pytest.fixture
def batch_on_wrong_device() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch: Any) -> None:
        x, y = batch
        out = model(x.to("meta"))  # the "meta" device stands in for a GPU here
        F.cross_entropy(out, y).backward()
        opt.step()

    where = ["0 (Linear)", site(step, "model(x.to")]
    return Case(model, data(), step, {"optimizer": opt}, "wrong-device", where)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.mask = torch.ones(3, device="meta")  # a plain attribute: not moved by .to()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture
def unregistered_tensor() -> Case:
    model = Masked()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = plain_step(model, opt)
    return Case(model, data(), step, {"optimizer": opt}, "wrong-device", ["mask (Masked)"])


@pytest.fixture
def frozen_in_optimizer() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)

    def step(batch: Any) -> None:
        x, y = batch
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # frozen weights keep a zero .grad

    step(next(iter(data())))  # trained a while, then the first layer was frozen
    model[0].requires_grad_(False)
    return Case(model, data(), step, {"optimizer": opt}, "frozen-in-optimizer", ["0.weight"])


@pytest.fixture
def decay_on_bias() -> Case:
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    where = ["0.bias", "1.weight"]
    return Case(
        model, data(), plain_step(model, opt), {"optimizer": opt}, "decay-on-bias-norm", where
    )


@pytest.fixture
def batchnorm_last_batch_of_one() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    where = ["batch_size=8", "1 (BatchNorm1d)"]  # 49 % 8 == 1
    return Case(
        model, data(n=49), plain_step(model, opt), {"optimizer": opt}, "batchnorm-batch-1", where
    )


@pytest.fixture
def batchnorm_batch_of_one() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(1, 8), torch.tensor([1]))] * 3
    step = plain_step(model, opt)
    where = ["1 (BatchNorm1d)", site(step, "model(x)")]
    return Case(model, batches, step, {"optimizer": opt}, "batchnorm-batch-1", where)


class SlowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Per-example work (think: JPEG decoding) done in the training process."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.002)
        return torch.randn(8), torch.tensor(i % 3)


@pytest.fixture
def starved_loader() -> Case:
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(SlowDataset(), batch_size=8, num_workers=0)
    where = ["DataLoader(num_workers=0)", "SlowDataset"]
    return Case(model, loader, plain_step(model, opt), {"optimizer": opt}, "loader-starved", where)


@pytest.fixture
def fp16_on_cpu() -> Case:
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch: Any) -> None:
        x, y = batch
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad()

    where = [site(step, "out = model(x)")]
    return Case(model, data(), step, {"optimizer": opt}, "fp16-on-cpu", where)


@pytest.fixture
def nondeterministic() -> Iterator[Case]:
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # deterministic asked in the config, not set
    kwargs = {"optimizer": opt, "config": {"deterministic": True}}
    yield Case(
        model, data(), plain_step(model, opt), kwargs, "nondeterministic", ["deterministic=true"]
    )
    torch.use_deterministic_algorithms(was)


@pytest.fixture
def clip_before_unscale() -> Case:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    def step(batch: Any) -> None:
        x, y = batch
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # still scaled by 65536
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    where = [site(step, "clip_grad_norm_")]
    return Case(model, data(), step, {"optimizer": opt}, "clip-before-unscale", where)


@pytest.fixture
def step_raises() -> Case:
    model = nn.Linear(8, 3)

    def step(batch: Any) -> None:
        x, _ = batch
        model(x)
        raise KeyError("label")

    return Case(model, data(), step, {}, "step-failed", [site(step, "raise KeyError")])


MISTAKES = {  # fixture -> the code it must produce
    "eval_mode_in_train": "eval-mode-in-train",
    "train_mode_in_eval": "train-mode-in-eval",
    "grad_in_eval": "grad-in-eval",
    "missing_zero_grad": "missing-zero-grad",
    "losses_appended": "graph-kept",
    "loss_summed": "graph-kept",
    "item_in_step": "host-sync",
    "batch_on_wrong_device": "wrong-device",
    "unregistered_tensor": "wrong-device",
    "frozen_in_optimizer": "frozen-in-optimizer",
    "decay_on_bias": "decay-on-bias-norm",
    "batchnorm_last_batch_of_one": "batchnorm-batch-1",
    "batchnorm_batch_of_one": "batchnorm-batch-1",
    "starved_loader": "loader-starved",
    "fp16_on_cpu": "fp16-on-cpu",
    "nondeterministic": "nondeterministic",
    "clip_before_unscale": "clip-before-unscale",
    "step_raises": "step-failed",
}

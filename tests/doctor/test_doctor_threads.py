"""The doctor on a user's own module class, and on a host whose load leaves torch no free cores.

Mode findings must point at the call of the model in the user's loop (where ``model.train()``
or ``model.eval()`` belongs), not at a line inside the user's ``forward``. The oversubscription
check is fed the host's facts directly, so these tests do not depend on the machine's load.
"""

from __future__ import annotations

import importlib.util
import inspect
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from runners import ROOT, run_kiln
from torch import nn
from training import plain_step

from kiln.config import Config
from kiln.doctor import check
from kiln.doctor.findings import ADVICE, format_report
from kiln.doctor.sites import short_path
from kiln.doctor.threads import (
    HostLoad,
    host_load,
    oversubscription_note,
    suggested_threads,
    thread_findings,
)
from kiln.perf.profile import Schedule, profile_training

USER_MODEL = textwrap.dedent(
    """\
    import torch
    from torch import nn


    class UserNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.drop = nn.Dropout(0.2)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            return self.fc2(self.drop(h))
    """
)

BUSY = HostLoad(cpus=2, threads=2, load1=7.0, runnable=8)  # a shared two-core host
IDLE = HostLoad(cpus=2, threads=2, load1=0.3, runnable=1)


@pytest.fixture
def user_net(tmp_path: Path) -> Iterator[type[nn.Module]]:
    """``UserNet`` from a module file of the user's own, outside the test's source."""
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("user_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.UserNet


def _site(fn: Callable[..., Any], text: str) -> str:
    fn = inspect.unwrap(fn)
    lines, start = inspect.getsourcelines(fn)
    hit = next(i for i, line in enumerate(lines) if text in line)
    return f"{short_path(inspect.getsourcefile(fn) or '')}:{start + hit}"


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))] * 3


def test_eval_mode_in_train_points_at_the_call_not_into_forward(
    user_net: type[nn.Module],
) -> None:
    model = user_net().eval()  # left over from an evaluation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = plain_step(model, opt)
    findings = check(model, _batches(), step, optimizer=opt, host=IDLE)
    assert [f.code for f in findings] == ["eval-mode-in-train"], format_report(findings)
    where = findings[0].where
    assert "drop (Dropout)" in where
    assert where.endswith(f"model called at {_site(step, 'model(x)')}"), where
    assert "user_model.py" not in where


def test_train_mode_in_eval_points_at_the_call_not_into_forward(
    user_net: type[nn.Module],
) -> None:
    model = user_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.inference_mode()
    def evaluate(batch: Any) -> torch.Tensor:
        return model(batch[0])  # no model.eval()

    findings = check(
        model, _batches(), plain_step(model, opt), optimizer=opt, eval_fn=evaluate, host=IDLE
    )
    assert [f.code for f in findings] == ["train-mode-in-eval"], format_report(findings)
    where = findings[0].where
    assert where.endswith(f"model called at {_site(evaluate, 'model(batch[0])')}"), where
    assert "user_model.py" not in where


def test_busy_host_with_default_threads_is_reported_with_the_fix(
    user_net: type[nn.Module],
) -> None:
    model = user_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    findings = check(model, _batches(), plain_step(model, opt), optimizer=opt, host=BUSY)
    assert [f.code for f in findings] == ["threads-oversubscribed"], format_report(findings)
    found = findings[0]
    assert "torch.set_num_threads(1)" in found.what and "OMP_NUM_THREADS=1" in found.what
    assert (
        found.where == "torch.get_num_threads()=2 on 2 cores; load average 7.00, 8 threads runnable"
    )
    assert found.why == ADVICE["threads-oversubscribed"].why and found.severity == "warning"
    assert "with 2 threads vs" in (found.cost or "") and "with 1 (" in (found.cost or "")
    assert torch.get_num_threads() == 1  # the cost measurement put the thread count back
    assert check(model, _batches(), plain_step(model, opt), optimizer=opt, host=IDLE) == []


@pytest.mark.parametrize(
    ("host", "k"),
    [
        (HostLoad(cpus=2, threads=2, load1=7.0, runnable=8), 1),
        (HostLoad(cpus=16, threads=16, load1=4.2, runnable=3), 12),  # load average decides
        (HostLoad(cpus=16, threads=16, load1=1.1, runnable=6), 11),  # the run queue decides
        (HostLoad(cpus=8, threads=32, load1=None, runnable=None), 8),  # more threads than cores
        (HostLoad(cpus=8, threads=8, load1=1.4, runnable=1), None),  # under one busy core
        (HostLoad(cpus=2, threads=1, load1=9.0, runnable=9), None),  # one thread already
        (HostLoad(cpus=16, threads=4, load1=6.0, runnable=3), None),  # threads fit the rest
    ],
)
def test_oversubscription_rule(host: HostLoad, k: int | None) -> None:
    found = thread_findings(host)
    if k is None:
        assert found == [] and oversubscription_note(host) is None
        return
    assert suggested_threads(host) == k
    assert [f.code for f in found] == ["threads-oversubscribed"]
    assert f"torch.set_num_threads({k})" in found[0].what
    note = oversubscription_note(host) or ""
    assert note.startswith("threads oversubscribed: ") and f"OMP_NUM_THREADS={k}" in note


def test_host_load_reads_this_host() -> None:
    host = host_load()
    assert host.cpus >= 1 and host.threads == torch.get_num_threads()
    assert host.runnable is None or host.runnable >= 1  # this process is running


def test_profile_notes_a_busy_host(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    schedule = Schedule(wait=0, warmup=1, active=1)
    res = profile_training(make_cfg(), tmp_path / "busy", schedule=schedule, rows=1, host=BUSY)
    assert any(
        n.startswith("threads oversubscribed") and "set_num_threads(1)" in n for n in res.notes
    )


def test_doctor_on_a_script_says_how_to_check_it_from_python(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('the doctor must not run this')\n")
    proc = run_kiln("doctor", str(script), cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "bad YAML" not in proc.stderr, proc.stderr
    assert "not a Python script" in proc.stderr
    assert "from kiln.doctor import check" in proc.stderr
    assert "check(model, loader, step_fn, optimizer=optimizer)" in proc.stderr

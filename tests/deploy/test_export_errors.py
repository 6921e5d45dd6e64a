"""``kiln export`` on a user's model it cannot capture, on a bad ``--out``, and its tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runners import run_kiln
from torch import nn
from training import train_digits_mlp

from kiln.deploy.export import ATOL, RTOL, TOLERANCE_WHY, ParityError, export_model
from kiln.deploy.export_errors import explain_export_failure, user_line
from kiln.errors import ModelError

# A user's model in a file of its own: forward branches on a tensor's value (line 14).
BRANCHY = textwrap.dedent(
    """\
    import torch
    from torch import nn


    class Branchy(nn.Module):
        def __init__(self, in_features: int, num_classes: int) -> None:
            super().__init__()
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(in_features, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.flatten(x)
            y = self.fc(x)
            if x.sum() > 0:
                return y * 2
            return y
    """
)
BRANCH_LINE = 14


@pytest.fixture(scope="module")
def branchy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the folder holding the user's module, a one-epoch run of that model)."""
    code = tmp_path_factory.mktemp("usercode")
    (code / "branchy_net.py").write_text(BRANCHY)
    sys.path.insert(0, str(code))
    try:
        target = ("model.target=branchy_net:Branchy", "model.kwargs={}")
        run = train_digits_mlp(tmp_path_factory.mktemp("runs"), *target)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("branchy_net", None)
    return code, run


def _kiln(code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``kiln ARGS --trust-code`` with the user's module importable (their own run's target)."""
    return run_kiln(*args, "--trust-code", path=(code,))


@pytest.mark.parametrize("fmt", ["exported", "onnx"])
def test_data_dependent_branch_is_one_line_naming_the_users_line(
    branchy_run: tuple[Path, Path], tmp_path: Path, fmt: str
) -> None:
    code, run = branchy_run
    proc = _kiln(code, "export", str(run), "--format", fmt, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # torch's graph dump and log lines are silenced
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert f"branchy_net.py:{BRANCH_LINE} (if x.sum() > 0:)" in lines[0]
    assert "--format torchscript" in lines[0] and "data-dependent" in lines[0]


def test_torchscript_is_the_format_that_works(
    branchy_run: tuple[Path, Path], tmp_path: Path
) -> None:
    code, run = branchy_run
    proc = _kiln(code, "export", str(run), "--format", "torchscript", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "method: torch.jit.script" in proc.stdout


def test_out_on_an_existing_file_is_one_line(
    branchy_run: tuple[Path, Path], tmp_path: Path
) -> None:
    code, run = branchy_run
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    proc = _kiln(code, "export", str(run), "--format", "torchscript", "--out", str(target))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"--out {target} is an existing file; give a folder" in lines[0]
    assert target.read_text() == "mine"


def test_failure_without_user_code_is_left_alone() -> None:
    # No frame of the user's code: Kiln's own model failed, which is a bug to report (exit 1).
    exc = RuntimeError("torch internal")
    assert explain_export_failure(exc, "exported") is exc
    assert user_line(exc) is None


def test_user_line_is_read_from_torchs_report_when_no_frame_has_it(tmp_path: Path) -> None:
    # Strict tracing leaves no frame of the user's code on the stack; torch names it in the text.
    model = tmp_path / "net.py"
    model.write_text("a = 1\nif x.item():\n")
    report = f'The following call raised this error:\n  File "{model}", line 2, in forward\n'
    err = explain_export_failure(RuntimeError("GuardOnDataDependentSymNode\n" + report), "onnx")
    assert isinstance(err, ModelError)
    assert "net.py:2 (if x.item():)" in str(err) and "--format torchscript" in str(err)


class _Shifted(nn.Module):
    """``fc`` plus a constant: exported next to a reference without it, a known difference."""

    def __init__(self, fc: nn.Linear, shift: float) -> None:
        super().__init__()
        self.fc, self.shift = fc, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.shift


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_parity_gate_is_1e_5_and_says_why(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    fc = nn.Linear(4, 3)
    x = torch.randn(16, 4)
    scale = float(fc(x).detach().abs().max())
    gate = ATOL + RTOL * scale
    assert (ATOL, RTOL) == (1e-5, 1e-5)
    # Three times the gate: a 1e-4 tolerance would let it through.
    with pytest.raises(ParityError, match="at batch 1: max abs"):
        export_model(_Shifted(fc, 3 * gate), x, tmp_path / "bad", format=fmt, reference=fc)
    result = export_model(_Shifted(fc, 0.2 * gate), x, tmp_path / "ok", format=fmt, reference=fc)
    assert all(p.ok for p in result.parity)
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["tolerance"]["atol"] == 1e-5 and manifest["tolerance"]["rtol"] == 1e-5
    assert manifest["tolerance"]["why"] == TOLERANCE_WHY[fmt]

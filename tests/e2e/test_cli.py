"""The CLI end to end: every bad input gives one clear line and exit code 2, no traceback."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runners import ROOT, run_kiln

from kiln.train.checkpoint import CheckpointError, load_checkpoint

FAST = ("model.name=mlp", "model.kwargs.hidden=[16]", "train.epochs=1", "log.tensorboard=false")


def _assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_version_help_env() -> None:
    assert run_kiln("--version").stdout.strip() == "kiln 0.1.0"
    helped = run_kiln("--help")
    assert helped.returncode == 0 and "train" in helped.stdout and "eval" in helped.stdout
    env = run_kiln("env")
    assert env.returncode == 0 and "torch" in env.stdout and "torch threads" in env.stdout


def test_help_does_not_import_torch() -> None:
    code = "import sys; import kiln, kiln.cli.main, kiln.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_print_config_shows_resolved_values() -> None:
    proc = run_kiln("train", str(ROOT / "configs/digits.yaml"), "optim.lr=0.5", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.5" in proc.stdout and "precision: bf16" in proc.stdout


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    p = tmp_path / "t.csv"
    p.write_text("a,b,label\n1,2,x\n3,nan,y\n" + "".join(f"{i},{i},x\n" for i in range(20)))
    return p


def test_bad_inputs_give_one_clear_line(tmp_path: Path, bad_csv: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: [unclosed\n")
    cases = [
        (("train", str(tmp_path / "nope.yaml")), ["config file not found"]),
        (("train", str(bad_yaml)), ["bad YAML", "line"]),
        (("train", "model.name=resnt"), ["unknown model 'resnt'", "did you mean 'resnet'?"]),
        (("train", "optim.lr=-0.1"), ["optim.lr", "greater than 0"]),
        (("train", "train.accumulate=0"), ["train.accumulate"]),
        (("train", "optim.lr_rate=1"), ["did you mean 'optim.lr'?"]),
        (("train", "data.name=csv", f"data.path={bad_csv}", "data.target=label"), ["column 'b'"]),
        (("train", "data.name=csv", f"data.path={bad_csv}", "data.target=lable"), ["'label'"]),
        (("train", "data.name=csv", f"data.path={tmp_path}/x.csv", "data.target=y"), ["x.csv"]),
        (("train", "model.target=nosuchpkg.mod:Net"), ["nosuchpkg"]),
        (("train", "precision=fp16"), ["precision=fp16 refused on CPU"]),
        (("eval", str(tmp_path)), ["not a Kiln run directory"]),
    ]
    for args, needles in cases:
        _assert_clean_error(
            run_kiln(*args, f"out_dir={tmp_path}/runs") if args[0] == "train" else run_kiln(*args),
            *needles,
        )


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    proc = run_kiln("train", "model.name=resnt", f"out_dir={tmp_path}", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_and_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)  # type: ignore[attr-defined]
    evil_path = tmp_path / "evil.ckpt"
    torch.save({"model": evil}, evil_path)
    raw_pickle = tmp_path / "raw.ckpt"
    raw_pickle.write_bytes(pickle.dumps(evil))
    for path in (evil_path, raw_pickle):
        with pytest.raises(CheckpointError, match="refused to load"):
            load_checkpoint(path)
        proc = run_kiln("train", *FAST, f"out_dir={tmp_path}/runs", f"resume={path}")
        _assert_clean_error(proc, "refused to load", "would run code")
    assert not marker.exists()

    good = tmp_path / "good.ckpt"
    torch.save({"model": {"w": torch.randn(100, 100)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    proc = run_kiln("train", *FAST, f"out_dir={tmp_path}/runs", f"resume={truncated}")
    _assert_clean_error(proc, "corrupt or truncated")


@pytest.mark.slow
def test_train_then_eval(tmp_path: Path) -> None:
    proc = run_kiln("train", *FAST, "name=t", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "t"
    assert "test accuracy:" in proc.stdout and f"run directory: {run}" in proc.stdout
    for f in (
        "config.yaml",
        "data_info.json",
        "metrics.jsonl",
        "model.safetensors",
        "summary.json",
    ):
        assert (run / f).is_file(), f
    ev = run_kiln("eval", str(run))
    assert ev.returncode == 0, ev.stderr
    assert "confusion matrix" in ev.stdout
    result = json.loads((run / "eval-test.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["acc"] == pytest.approx(summary["test"]["acc"], abs=1e-6)
    info = json.loads((run / "data_info.json").read_text())
    assert sum(map(sum, result["confusion_matrix"])) == info["extra"]["splits"]["test"]
    # a second run with the same name never overwrites the first
    again = run_kiln("train", *FAST, "name=t", f"out_dir={tmp_path}")
    assert again.returncode == 0 and (tmp_path / "t-1" / "model.safetensors").is_file()

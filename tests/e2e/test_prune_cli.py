"""``kiln prune`` end to end on a tiny trained run: files, table, loadable results, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runners import ROOT, run_kiln
from safetensors import safe_open

from kiln.cli.prune import run_prune
from kiln.compress.prune.core import load_pruned
from kiln.config import load_config
from kiln.train.build import build_data_for
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

QUIET = ["log.tensorboard=false", "log.progress=false", "checkpoint.every_epoch=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP with one hidden layer of 32, trained for 3 epochs."""
    out = tmp_path_factory.mktemp("prune")
    overrides = [*QUIET, f"out_dir={out}", "name=mlp", "train.epochs=3", "model.kwargs.hidden=[32]"]
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", overrides)
    return Trainer(cfg, verbose=False).fit().run_dir


def _test_split(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = build_data_for(load_config(run / "config.yaml"))
    return data.test.dataset.__getitems__(data.test.indices)  # type: ignore[union-attr]


@pytest.mark.slow
def test_unstructured_prune_writes_a_plain_model_and_the_table(run: Path) -> None:
    proc = run_kiln("prune", str(run), "--amount", "0.5", "--scope", "global")
    assert proc.returncode == 0, proc.stderr
    out = run / "pruned"
    assert "| total | | " in proc.stdout and "| 0.5000 |" in proc.stdout
    assert "| fp32 |" in proc.stdout and "| pruned 50% |" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["fp32", "pruned 50%"]
    assert report["sparsity"]["total"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["options"]["scope"] == "global"
    assert "zeros are stored densely" in proc.stdout
    assert report["zlib_bytes"]["pruned"] < report["zlib_bytes"]["fp32"]
    acc = report["cycles"][0]["finetune"]["finetuned"]["acc"]
    assert report["rows"][1]["metrics"]["acc"] == pytest.approx(acc)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any(k.endswith(("_orig", "_mask")) for k in names)
    x, _ = _test_split(run)
    plain = load_model(out / "model.safetensors")  # the run-style loader works unchanged
    torch.testing.assert_close(plain(x), load_pruned(out)(x))
    zeros = sum(int((p == 0).sum()) for n, p in plain.named_parameters() if n.endswith("weight"))
    total = sum(p.numel() for n, p in plain.named_parameters() if n.endswith("weight"))
    assert zeros == round(0.5 * total)
    assert (out / "finetune" / "cycle-1" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_structured_iterative_rewind_to_out(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the verb's function; the subprocess path is covered above): saves an import.
    out = tmp_path / "small"
    report = run_prune(
        str(run),
        amount=0.5,
        structured=True,
        iterative=2,
        rewind=True,
        finetune_epochs=2,
        out=str(out),
    )
    stdout = capsys.readouterr().out
    assert "| hidden.0 | in_features=64, out_features=32 | in_features=64, out_features=16 |" in (
        stdout
    )
    assert "cycle 2: target 0.5" in stdout and "rewound to the initial weights" in stdout
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    base, small = report["rows"]
    assert small["size_bytes"] < base["size_bytes"]
    assert report["params"]["after"] < report["params"]["before"]
    model = load_pruned(out)
    assert model.hidden[0].out_features == 16 and model.fc.in_features == 16
    x, y = _test_split(run)
    acc = float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(small["metrics"]["acc"], abs=1e-6)


def test_bad_input_gives_one_clear_line(run: Path, tmp_path: Path) -> None:
    proc = run_kiln("prune", str(run), "--amount", "1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --amount must be a fraction in [0, 1), got 1.5")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    cases: list[tuple[dict[str, object], str]] = [
        ({"amount": -0.5}, r"in \[0, 1\), got -0.5"),
        ({"method": "abs"}, "unknown unstructured pruning method 'abs'; allowed: l1, random"),
        ({"scope": "net"}, "unknown scope 'net'; allowed: layer, global"),
        ({"structured": True, "scope": "global"}, "use --scope layer"),
        ({"iterative": 0}, "--iterative must be a whole number >= 1"),
        ({"iterative": 3, "finetune_epochs": 0}, "set --finetune-epochs >= 1 or --iterative 1"),
        ({"rewind": True, "finetune_epochs": 0}, "--rewind resets"),
        ({"finetune_epochs": -1}, "--finetune-epochs must be >= 0"),
        ({"out": str(busy)}, "is not empty"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_prune(str(run), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="not a Kiln run directory"):
        run_prune(str(tmp_path))

"""``kiln eval`` for ensembles, snapshot ensembles and TTA, checked against hand computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from runners import ROOT, run_kiln

from kiln.cli.eval import run_eval
from kiln.config import load_config
from kiln.train.build import build_data_for
from kiln.train.checkpoint import load_checkpoint
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

QUIET = ["log.tensorboard=false", "log.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small digits MLPs (same seed and split, different widths) and a tiny image ResNet."""
    out = tmp_path_factory.mktemp("eval")
    jobs = {
        "a": ("digits_mlp.yaml", ["model.kwargs.hidden=[32]"]),
        "b": ("digits_mlp.yaml", ["model.kwargs.hidden=[48]"]),
        "img": (
            "digits.yaml",
            [
                "model.kwargs.depths=[1]",
                "model.kwargs.width=8",
                "data.image_size=12",
                "precision=fp32",
            ],
        ),
    }
    made = {}
    for name, (config, extra) in jobs.items():
        overrides = [*QUIET, f"out_dir={out}", f"name={name}", "train.epochs=2", *extra]
        cfg = load_config(ROOT / "configs" / config, overrides)
        made[name] = Trainer(cfg, verbose=False).fit().run_dir
    return made


def _test_split(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = build_data_for(load_config(run / "config.yaml"))
    return data.test.dataset.__getitems__(data.test.indices)  # type: ignore[union-attr]


def _summary_acc(run: Path) -> float:
    return float(json.loads((run / "summary.json").read_text())["test"]["acc"])


@pytest.mark.slow
def test_ensemble_of_two_runs(runs: dict[str, Path]) -> None:
    a, b = runs["a"], runs["b"]
    proc = run_kiln("eval", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of 2 runs, mean probability" in proc.stdout
    result = json.loads((a / "eval-test-ensemble.json").read_text())
    assert [m["name"] for m in result["members"]] == [str(a), str(b)]
    for member, run in zip(result["members"], (a, b), strict=True):
        assert member["metrics"]["acc"] == pytest.approx(_summary_acc(run), abs=1e-6)
    x, y = _test_split(a)
    with torch.no_grad():
        p = torch.stack([load_model(r)(x).softmax(-1) for r in (a, b)]).mean(0)
    assert result["metrics"]["acc"] == pytest.approx(float((p.argmax(-1) == y).float().mean()))
    nll = -p.log().gather(1, y[:, None]).mean()
    assert result["metrics"]["loss"] == pytest.approx(float(nll), rel=1e-5)
    assert sum(map(sum, result["metrics"]["confusion_matrix"])) == len(y)


@pytest.mark.slow
def test_tta_flip_on_an_image_run(runs: dict[str, Path]) -> None:
    img = runs["img"]
    proc = run_kiln("eval", str(img), "tta=flip")
    assert proc.returncode == 0, proc.stderr
    assert "no TTA" in proc.stdout and "tta=flip" in proc.stdout
    result = json.loads((img / "eval-test-tta.json").read_text())
    assert result["tta"] == ["flip"]
    assert result["plain"]["acc"] == pytest.approx(_summary_acc(img), abs=1e-6)
    x, y = _test_split(img)
    model = load_model(img)
    with torch.no_grad():
        p = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    assert result["metrics"]["acc"] == pytest.approx(float((p.argmax(-1) == y).float().mean()))
    assert result["metrics"]["loss"] != pytest.approx(result["plain"]["loss"])


def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by ``dy`` rows and ``dx`` columns, edge pixels repeated (by index clamping)."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[..., rows, :][..., cols]


def test_snapshot_vote_ensemble_with_tta(runs: dict[str, Path]) -> None:
    """Each snapshot averages its five shift views, then the snapshots vote: checked by hand."""
    img = runs["img"]
    result = run_eval([str(img)], snapshots=2, vote=True, tta="shift")
    assert (img / "eval-test-snapshots-vote-tta.json").is_file()
    names = [m["name"] for m in result["members"]]
    ckpts = sorted((img / "checkpoints").glob("step-*.ckpt"), key=lambda p: int(p.stem[5:]))
    assert names == [p.stem for p in ckpts[-2:]]
    assert result["mode"] == "vote" and result["tta"] == ["shift"] and result["snapshots"] == 2

    x, y = _test_split(img)
    smoothing = load_config(img / "config.yaml").loss.label_smoothing

    def loss(logp: torch.Tensor) -> float:  # the run's loss: cross-entropy, maybe smoothed
        return float(torch.nn.functional.cross_entropy(logp, y, label_smoothing=smoothing))

    views = [x, *(_moved(x, dy, dx) for dy, dx in ((0, 2), (0, -2), (2, 0), (-2, 0)))]
    member_p = []
    for ckpt in ckpts[-2:]:
        model = load_model(img)
        model.load_state_dict(load_checkpoint(ckpt)["model"])
        with torch.no_grad():
            member_p.append(torch.stack([model.eval()(v).softmax(-1) for v in views]).mean(0))
    for member, p in zip(result["members"], member_p, strict=True):
        assert member["metrics"]["acc"] == pytest.approx(float((p.argmax(-1) == y).float().mean()))
        assert member["metrics"]["loss"] == pytest.approx(loss(p.log()), rel=1e-4)
    votes = sum(torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float() for p in member_p)
    vote_p = (votes + 0.5 * torch.stack(member_p).mean(0)) / (len(member_p) + 0.5)
    pred = vote_p.argmax(-1)
    assert result["metrics"]["acc"] == pytest.approx(float((pred == y).float().mean()))
    # The vote's loss is the cross-entropy of the vote distribution: with two members the
    # majority's argmax equals the mean's, so the loss is what tells a vote from a mean.
    assert result["metrics"]["loss"] == pytest.approx(loss(vote_p.clamp_min(1e-12).log()), rel=1e-4)
    classes = vote_p.shape[-1]
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    assert result["metrics"]["confusion_matrix"] == confusion.tolist()


def test_bad_requests_say_what_to_do(runs: dict[str, Path], tmp_path: Path) -> None:
    a, b = str(runs["a"]), str(runs["b"])
    other_seed = tmp_path / "other-seed"
    shutil.copytree(runs["b"], other_seed)
    cfg = yaml.safe_load((other_seed / "config.yaml").read_text())
    cfg["seed"] = 1
    (other_seed / "config.yaml").write_text(yaml.safe_dump(cfg))
    cases: list[tuple[tuple[list[str], dict[str, Any]], str]] = [
        (([a, "tta=flip"], {}), "flip, vflip and shift suit images"),
        (([a, "tta=flip"], {"tta": "shift"}), "TTA given twice"),
        (([a, "foo=1"], {}), "unknown option 'foo=1'"),
        (([a, "tta=none"], {}), "names no transform"),
        (([a, b], {"snapshots": 2}), "give one run"),
        (([a, b], {"checkpoint": "last"}), "--checkpoint picks one checkpoint"),
        (([a], {"vote": True}), "--vote combines several models"),
        (([a], {"snapshots": 5}), "asked for 5 snapshots"),
        (([a, str(runs["img"])], {}), r"input_shape differs"),
        (([a, str(other_seed)], {}), r"hold out different examples \(split seed .*: 0 vs 1\)"),
    ]
    for (paths, options), message in cases:
        with pytest.raises(ValueError, match=message):
            run_eval(paths, **options)

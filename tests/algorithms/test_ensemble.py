"""Ensembles: mean and vote against hand computations, compatibility checks, trained digits runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.algorithms.ensemble import (
    Ensemble,
    check_compatible,
    check_same_split,
    load_ensemble,
    load_snapshots,
    mean_log_prob,
    snapshot_paths,
)
from kiln.config import load_config
from kiln.data.base import DataBundle, DataInfo
from kiln.train.build import build_data_for
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


class Fixed(nn.Module):
    """Returns the same logits whatever the input (one row per example)."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits: torch.Tensor
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_mean_is_log_of_average_probability() -> None:
    torch.manual_seed(0)
    members = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(7, 4)
    out = Ensemble(members, mode="mean")(x)
    with torch.no_grad():
        p = (members[0](x).softmax(-1) + members[1](x).softmax(-1) + members[2](x).softmax(-1)) / 3
    torch.testing.assert_close(out, p.log())
    # confident members: averaging in log space does not underflow to log(0)
    sharp = mean_log_prob([torch.tensor([[200.0, 0.0]]), torch.tensor([[200.0, -200.0]])])
    assert torch.isfinite(sharp).all()
    torch.testing.assert_close(sharp[0, 1], torch.tensor(-200.0 - math.log(2.0)))


def test_vote_is_the_majority() -> None:
    # 4 examples, 3 classes; each member's argmax per example in the comments
    a = Fixed([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])  # 0 1 2 0
    b = Fixed([[0, 5, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]])  # 1 1 2 2
    c = Fixed([[5, 0, 1], [5, 0, 0], [5, 0, 0], [0, 0, 5]])  # 0 0 0 2
    out = Ensemble([a, b, c], mode="vote")(torch.zeros(4, 1))
    assert out.argmax(-1).tolist() == [0, 1, 2, 2]
    votes = torch.tensor([[2.0, 1, 0], [1, 2, 0], [1, 0, 2], [1, 0, 2]])
    mean_p = torch.stack([m.logits.softmax(-1) for m in (a, b, c)]).mean(0)
    torch.testing.assert_close(out.exp(), (votes + 0.5 * mean_p) / 3.5)
    # a tie (one vote each) goes to the class with the higher mean probability, not the lower index
    tie = Ensemble([Fixed([[0.0, 0.4, 0.0]]), Fixed([[3.0, 0.0, 0.0]])], mode="vote")
    logp = tie(torch.zeros(1, 1))
    assert logp.argmax(-1).tolist() == [0]
    tie = Ensemble([Fixed([[0.0, 3.0, 0.0]]), Fixed([[0.4, 0.0, 0.0]])], mode="vote")
    assert tie(torch.zeros(1, 1)).argmax(-1).tolist() == [1]


def test_regression_and_bad_settings() -> None:
    torch.manual_seed(0)
    members = [nn.Linear(3, 2) for _ in range(2)]
    x = torch.randn(5, 3)
    with torch.no_grad():
        want = (members[0](x) + members[1](x)) / 2
    torch.testing.assert_close(Ensemble(members, task="regression")(x), want)
    with pytest.raises(ValueError, match="mode='vote' needs class predictions"):
        Ensemble(members, mode="vote", task="regression")
    with pytest.raises(ValueError, match="mode must be one of mean, vote"):
        Ensemble(members, mode="median")
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])


def test_compatibility_names_the_mismatch() -> None:
    a = DataInfo("classification", (64,), num_classes=10)
    assert check_compatible(["a", "b"], [a, DataInfo("classification", (64,), 10)]) is a
    cases = [
        (DataInfo("regression", (64,)), r"task differs \(a: classification, b: regression\)"),
        (DataInfo("classification", (64,), 3), r"num_classes differs \(a: 10, b: 3\)"),
        (DataInfo("classification", (1, 8, 8), 10), r"input_shape differs \(a: \(64,\), b"),
    ]
    for other, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_compatible(["a", "b"], [a, other])
    named = DataInfo("classification", (2,), 2, class_names=["cat", "dog"])
    swapped = DataInfo("classification", (2,), 2, class_names=["dog", "cat"])
    with pytest.raises(ValueError, match="class_names differ"):
        check_compatible(["a", "b"], [named, swapped])


def _by_hand_tta_vote(
    members: list[nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vote over TTA(flip) members, from the definitions: (vote probs, member probs, plain)."""
    with torch.no_grad():
        plain = torch.stack([m(x).softmax(-1) for m in members])
        flipped = torch.stack(
            [m(x[..., torch.arange(x.shape[-1] - 1, -1, -1)]).softmax(-1) for m in members]
        )
    member_p = (plain + flipped) / 2  # each member's TTA: mean probability of x and its mirror
    votes = torch.zeros_like(member_p[0])
    for p in member_p:
        votes[torch.arange(len(x)), p.argmax(-1)] += 1.0
    n = len(members)
    return (votes + 0.5 * member_p.mean(0)) / (n + 0.5), member_p, plain


def test_vote_over_tta_members_equals_the_hand_computation() -> None:
    """A vote ensemble of TTA members: each member averages its views, then members vote.

    The inputs are chosen so that the mechanism shows: TTA changes some members' answers, and
    the majority differs from the mean-probability answer on some examples. So an ensemble that
    averaged instead of voting, or members that skipped TTA, would give other predictions.
    """
    from kiln.algorithms.tta import TTA

    torch.manual_seed(3)
    members: list[nn.Module] = [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval() for _ in range(3)
    ]
    x = torch.randn(300, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    want, member_p, plain = _by_hand_tta_vote(members, x)
    ens = Ensemble([TTA(m, "flip", task="classification") for m in members], mode="vote")
    with torch.no_grad():
        got = ens(x)
    torch.testing.assert_close(got.exp(), want)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the test has power: both mechanisms change predictions on these inputs
    assert (member_p.argmax(-1) != plain.argmax(-1)).any(), "TTA changes no member's answer"
    mean_answer = member_p.mean(0).argmax(-1)
    assert (want.argmax(-1) != mean_answer).sum() >= 3, "vote and mean agree everywhere"


# --------------------------------------------------------------------------- trained runs

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataBundle, list[Path]]:
    """Three digits MLPs that differ only in their seed (init and data order).

    They share one data bundle (the split of seed 0), so all three are scored on examples none
    of them trained on.
    """
    out = tmp_path_factory.mktemp("ens")
    overrides = [
        "train.epochs=3",
        "log.tensorboard=false",
        "log.progress=false",
        f"out_dir={out}",
        "checkpoint.keep_last=3",
        "model.kwargs.hidden=[64]",
    ]
    cfg0 = load_config(ROOT / "configs/digits_mlp.yaml", overrides)
    data = build_data_for(cfg0)
    runs = []
    for seed in SEEDS:
        cfg = load_config(ROOT / "configs/digits_mlp.yaml", [*overrides, f"seed={seed}"])
        runs.append(Trainer(cfg, data=data, verbose=False).fit().run_dir)
    return data, runs


def _accuracy(model: nn.Module, data: DataBundle) -> float:
    x, y = data.test.dataset.__getitems__(data.test.indices)  # type: ignore[union-attr]
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def test_ensemble_of_three_runs_beats_their_mean(
    digits: tuple[DataBundle, list[Path]],
) -> None:
    data, runs = digits
    members = [load_model(r) for r in runs]
    accs = [_accuracy(m, data) for m in members]
    ens = load_ensemble(runs)
    acc = _accuracy(ens, data)
    assert acc >= sum(accs) / len(accs), (acc, accs)
    assert acc > 0.8
    x, _ = data.test.dataset.__getitems__(data.test.indices[:50])  # type: ignore[union-attr]
    with torch.no_grad():
        manual = torch.stack([m(x).softmax(-1) for m in members]).mean(0).log()
        torch.testing.assert_close(ens(x), manual)
    assert _accuracy(load_ensemble(runs, mode="vote"), data) >= min(accs)


def test_runs_with_different_seeds_hold_out_different_examples(
    digits: tuple[DataBundle, list[Path]], tmp_path: Path
) -> None:
    _, runs = digits
    with pytest.raises(ValueError, match=r"hold out different examples \(split seed .*: 0 vs 1\)"):
        check_same_split(runs[:2])
    pinned = tmp_path / "pinned"  # seed 1, but the split of seed 0: comparable
    shutil.copytree(runs[1], pinned)
    cfg_text = (pinned / "config.yaml").read_text().replace("split_seed: null", "split_seed: 0")
    (pinned / "config.yaml").write_text(cfg_text)
    check_same_split([runs[0], pinned])
    twin = tmp_path / "twin"
    shutil.copytree(runs[0], twin)
    check_same_split([runs[0], twin])  # same seed and data settings: fine
    info = json.loads((twin / "data_info.json").read_text())
    info["num_classes"] = 9
    (twin / "data_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"num_classes differs \(.*: 10, .*twin: 9\)"):
        load_ensemble([runs[0], twin])


def test_snapshot_ensemble_takes_the_last_checkpoints(
    digits: tuple[DataBundle, list[Path]],
) -> None:
    data, runs = digits
    paths = snapshot_paths(runs[0], 2)
    steps = [int(p.stem.split("-")[1]) for p in sorted(paths)]
    assert [p.name for p in paths] == [f"step-{s}.ckpt" for s in steps] and steps[0] < steps[1]
    assert paths[-1] == resolve_checkpoint(runs[0])  # the newest is the run's "last"
    ens = load_snapshots(runs[0], 2)
    last = load_checkpoint(paths[-1])["model"]
    for name, value in ens.members[-1].state_dict().items():
        torch.testing.assert_close(value, last[name])
    first, second = (m.state_dict()["fc.weight"] for m in ens.members)
    assert not torch.equal(first, second)
    assert _accuracy(ens, data) > 0.7
    with pytest.raises(ValueError, match=r"asked for 5 snapshots but .* has 3 .*step-\d+\.ckpt"):
        snapshot_paths(runs[0], 5)

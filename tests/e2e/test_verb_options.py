"""``inspect.<name>=value`` and ``tune.<name>=value`` options: a bad one is one line and exit 2.

Every option of :class:`kiln.cli.options.InspectOptions`, :class:`LrFindOptions` and
:class:`BatchFindOptions` is given a bad value; the message names the option and the value (and
the allowed values or the closest name where there are some), as a bad config key's does.
"""

from __future__ import annotations

import pytest
from runners import ROOT, run_kiln

from kiln.cli.errors import run_cli
from kiln.cli.inspect import run_inspect, split_inspect_options
from kiln.cli.options import (
    BatchFindOptions,
    InspectOptions,
    LrFindOptions,
    parse_options,
    take_options,
)
from kiln.cli.tune import run_tune, split_tune_options
from kiln.errors import UsageError

CFG = str(ROOT / "configs/digits_mlp.yaml")

# option=value -> what the one line must say
INSPECT = [
    ("anomaly=maybe", ["inspect.anomaly='maybe' must be true or false"]),
    ("mode=test", ["inspect.mode:", "(got 'test')", "allowed: train, eval"]),
    ("split=tset", ["inspect.split:", "allowed: test, val, train", "did you mean 'test'?"]),
    ("batch=0", ["inspect.batch:", "greater than or equal to 1", "(got 0)"]),
    ("samples=x", ["inspect.samples='x' is not a valid int"]),
    ("noise=-0.5", ["inspect.noise:", "greater than or equal to 0", "(got -0.5)"]),
    ("noise=nan", ["inspect.noise:", "finite number"]),
    ("depth=1.5", ["inspect.depth='1.5' is not a valid int"]),
    ("bins=0", ["inspect.bins:", "greater than or equal to 1"]),
    ("bins=99999999999999999999999", ["inspect.bins:", "does not fit in a 64-bit integer"]),
    ("binz=3", ["unknown inspect option 'binz'", "did you mean 'inspect.bins'?"]),
]
LR = [
    ("steps=abc", ["tune.steps='abc' is not a valid int"]),
    ("start_lr=small", ["tune.start_lr='small' is not a valid float"]),
    ("end_lr=inf", ["tune.end_lr:", "finite number"]),
    ("smoothing=high", ["tune.smoothing='high' is not a valid float"]),
    ("stpes=3", ["unknown tune option 'stpes'", "did you mean 'tune.steps'?"]),
    ("max_batch=3", ["tune.max_batch applies to 'kiln tune batch', not 'kiln tune lr'"]),
]
BATCH = [
    ("mode=powr", ["tune.mode:", "allowed: power, binary", "did you mean 'power'?"]),
    ("budget_mb=0", ["tune.budget_mb:", "greater than 0", "(got 0)"]),
    ("budget_mb=-inf", ["tune.budget_mb:", "finite number"]),
    ("max_batch=0", ["tune.max_batch:", "greater than or equal to 1"]),
    ("max_batch=2.5", ["tune.max_batch='2.5' is not a valid int"]),
    ("steps=3", ["tune.steps applies to 'kiln tune lr', not 'kiln tune batch'"]),
]


def _one_line(capsys: pytest.CaptureFixture[str], fn) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(fn, debug=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("option", "needles"), INSPECT)
def test_a_bad_inspect_option_is_one_line(
    option: str, needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line(capsys, lambda: run_inspect([CFG, f"inspect.{option}"]))
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(("what", "option", "needles"), [("lr", *c) for c in LR])
def test_a_bad_tune_lr_option_is_one_line(
    what: str, option: str, needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for word in (f"tune.{option}", f"--{option.replace('_', '-')}"):
        err = _one_line(capsys, lambda w=word: run_tune(what, [CFG, w]))  # type: ignore[misc]
        for needle in needles:
            assert needle in err, (word, err)


@pytest.mark.parametrize(("option", "needles"), BATCH)
def test_a_bad_tune_batch_option_is_one_line(
    option: str, needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line(capsys, lambda: run_tune("batch", [CFG, f"tune.{option}"]))
    for needle in needles:
        assert needle in err, err


def test_every_option_is_covered() -> None:
    """A new option gets a bad-value case above (or is a free-form string)."""
    covered = {o.split("=")[0].replace("-", "_") for o, _ in INSPECT}
    assert set(InspectOptions.model_fields) - {"layer"} <= covered
    covered = {o.split("=")[0].replace("-", "_") for o, _ in LR + BATCH}
    assert set(LrFindOptions.model_fields) | set(BatchFindOptions.model_fields) <= covered


def test_good_values_parse_as_their_types() -> None:
    opts, rest = split_inspect_options(
        ["c.yaml", "inspect.anomaly=yes", "inspect.mode= eval ", "inspect.noise=0", "seed=1"]
    )
    assert rest == ["c.yaml", "seed=1"]
    assert opts == {
        "anomaly": True,
        "layer": None,
        "mode": "eval",
        "split": "test",
        "batch": None,
        "samples": 25,
        "noise": 0.0,
        "depth": None,
        "bins": 40,
    }
    opts, _ = split_tune_options("lr", ["--start-lr", "1e-5", "tune.steps=7"])
    assert opts == {"steps": 7, "start_lr": 1e-5, "end_lr": 10.0, "smoothing": 0.98}
    assert split_tune_options("batch", ["--budget-mb=1.5"])[0]["budget_mb"] == 1.5


def test_every_problem_is_reported_at_once() -> None:
    values, _ = take_options("inspect", ["inspect.bins=0", "inspect.split=x", "inspect.foo=1"])
    with pytest.raises(UsageError) as info:
        parse_options(InspectOptions, "inspect", values)
    msg = str(info.value)
    assert "inspect.bins:" in msg and "inspect.split:" in msg and "'foo'" in msg


def test_a_flag_without_its_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line(capsys, lambda: run_tune("batch", [CFG, "--max-batch"]))
    assert "--max-batch needs a value" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("inspect", CFG, "inspect.split=tset"), "did you mean 'test'?"),
        (("tune", "batch", CFG, "tune.mode=powr"), "allowed: power, binary"),
    ],
)
def test_the_kiln_command_exits_2_on_a_bad_option(args: tuple[str, ...], needle: str) -> None:
    proc = run_kiln(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr
    assert "Traceback" not in proc.stderr

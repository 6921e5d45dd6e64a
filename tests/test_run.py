"""kiln.run: the run-directory contract (paths, config, input contract, weights, status)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln import run
from kiln.config import Config, ConfigError, load_config
from kiln.data.base import DataInfo

INFO = DataInfo(
    task="classification",
    input_shape=(1, 8, 8),
    num_classes=3,
    class_names=["a", "b", "c"],
    extra={"mean": [0.5]},
)


def _run_dir(tmp_path: Path) -> Path:
    """A run directory as ``kiln train`` leaves it before the first checkpoint."""
    d = tmp_path / "runs" / "x"
    d.mkdir(parents=True)
    run.write_run_files(d, load_config(None, ["name=x", "seed=3"]), INFO)
    return d


def test_paths_are_the_documented_names() -> None:
    # Every verb and every old run directory depends on these names: changing one breaks runs.
    assert (run.CONFIG, run.DATA_INFO, run.WEIGHTS, run.SUMMARY, run.METRICS, run.CHECKPOINTS) == (
        "config.yaml",
        "data_info.json",
        "model.safetensors",
        "summary.json",
        "metrics.jsonl",
        "checkpoints",
    )


def test_written_files_read_back_equal(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    cfg = run.read_config(d)
    assert isinstance(cfg, Config) and (cfg.name, cfg.seed) == ("x", 3)
    assert run.read_config(d, ["seed=5"]).seed == 5
    info = run.read_data_info(d)
    assert info == INFO
    assert isinstance(info.input_shape, tuple)  # JSON wrote a list


def test_data_info_from_json_makes_input_shape_a_tuple() -> None:
    info = run.data_info_from_json('{"task": "regression", "input_shape": [4, 2]}')
    assert info.input_shape == (4, 2) and isinstance(info.input_shape, tuple)
    # the dict form leaves its argument alone
    raw = {"task": "lm", "input_shape": [8]}
    assert run.data_info_from_dict(raw).input_shape == (8,) and raw["input_shape"] == [8]


def test_run_dir_of_accepts_the_folder_or_a_file_in_it(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    (d / run.WEIGHTS).write_bytes(b"")
    assert run.run_dir_of(d) == d
    assert run.run_dir_of(str(d / run.WEIGHTS)) == d


def test_run_dir_of_refuses_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a Kiln run directory \(no config.yaml\)"):
        run.run_dir_of(tmp_path)


def test_run_dir_of_checkpoint() -> None:
    assert run.run_dir_of_checkpoint(Path("r/checkpoints/step-3.ckpt")) == Path("r")
    assert run.run_dir_of_checkpoint(Path("r/other/step-3.ckpt")) is None


def test_missing_config_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        run.read_config(tmp_path)


def test_missing_data_info_names_the_file_and_the_fix(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    (d / run.DATA_INFO).unlink()
    with pytest.raises(FileNotFoundError, match=r"data_info\.json is missing; is .* a complete"):
        run.read_data_info(d)
    with pytest.raises(FileNotFoundError, match="is missing; serve needs it"):
        run.read_data_info(d, hint="serve needs it")


def test_weights_file(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="may not have finished") as info:
        run.weights_file(d)
    # a run directory gets the exact command that finishes it
    assert f"no model.safetensors in {d};" in str(info.value)
    assert f"resume it with `kiln train {d / 'config.yaml'} resume={d}`" in str(info.value)
    with pytest.raises(FileNotFoundError, match="`kiln train <config> resume=<run>`"):
        run.weights_file(tmp_path / "elsewhere.safetensors")
    (d / run.WEIGHTS).write_bytes(b"")
    assert run.weights_file(d) == d / run.WEIGHTS
    assert run.weights_file(d / run.WEIGHTS) == d / run.WEIGHTS


@pytest.mark.parametrize("text", [None, "{not json", "[1, 2]"])
def test_read_summary_is_none_when_missing_or_not_an_object(tmp_path: Path, text: str) -> None:
    if text is not None:
        (tmp_path / run.SUMMARY).write_text(text)
    assert run.read_summary(tmp_path) is None


def test_status_of_a_run_as_it_goes(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    s = run.status(d)
    assert (s.run_dir, s.finished, s.has_weights, s.last_checkpoint) == (d, False, False, None)
    folder = d / run.CHECKPOINTS
    folder.mkdir()
    for name in ("step-9.ckpt", "step-10.ckpt", "step-x.ckpt", "last"):
        (folder / name).write_bytes(b"")
    s = run.status(d)
    # by step, not by name: step-10 is newer than step-9; names that are no step are skipped
    assert [p.name for p in s.checkpoints] == ["step-9.ckpt", "step-10.ckpt"]
    assert s.last_checkpoint == folder / "step-10.ckpt" and not s.finished
    (d / run.WEIGHTS).write_bytes(b"")
    (d / run.SUMMARY).write_text(json.dumps({"steps": 10}))
    s = run.status(d / run.WEIGHTS)
    assert s.finished and s.has_weights and s.run_dir == d


def test_status_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Kiln run directory"):
        run.status(tmp_path)


def test_importing_kiln_run_stays_light() -> None:
    # Every layer (and `kiln --help`) may import it: it must not pull in torch or training code.
    import subprocess
    import sys

    code = "import sys, kiln.run; print([m for m in ('torch', 'kiln.train') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

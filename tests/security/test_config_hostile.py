"""Hostile configs and overrides: refused in one line, in bounded time and memory, nothing written.

Most cases call :func:`kiln.config.load_config` in-process (fast); a handful run ``kiln train``
to check the whole path: exit 2, one line on stderr, no traceback, the child's time and peak
memory bounded, no run directory made.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from runners import kiln_env

from kiln.config import Config, ConfigError, load_config

# A 9-way alias tree 12 levels deep: under 700 bytes, 9**12 (2.8e11) values when walked as a tree.
BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    + ["model: {kwargs: {w: *a11}}"]
)


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def _refused(path: Path | None, overrides: list[str] | None = None) -> str:
    """The one-line ConfigError message, checking time and Python allocations are bounded."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path, overrides or [])
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < 10, f"took {took:.1f} s"
    assert peak < 200 * 2**20, f"allocated {peak / 2**20:.0f} MiB"
    message = str(info.value)
    assert "\n" not in message
    return message


def _kiln_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run ``kiln ARGS`` under a wrapper whose only child is kiln: (result, seconds, peak KiB)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run([sys.executable, '-m', 'kiln', *sys.argv[1:]], timeout=60)\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'{time.perf_counter() - t} {rss}', file=sys.stderr)\n"
        "sys.exit(p.returncode)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=kiln_env(),
    )
    *lines, measured = proc.stderr.strip().splitlines()
    seconds, rss = measured.split()
    proc.stderr = "\n".join(lines)
    return proc, float(seconds), int(rss)


def _assert_cli_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------- the file itself


def test_alias_bomb_cli_is_refused_fast_and_small(tmp_path: Path) -> None:
    bomb = _write(tmp_path, "bomb.yaml", BOMB)
    assert bomb.stat().st_size < 1000
    proc, seconds, rss_kib = _kiln_measured("train", str(bomb), cwd=tmp_path)
    _assert_cli_refused(proc, str(bomb), "expands to more than")
    assert seconds < 10, f"kiln train took {seconds:.1f} s"
    assert rss_kib < 400 * 1024, f"kiln train peaked at {rss_kib / 1024:.0f} MiB"
    assert not (tmp_path / "runs").exists()


def test_alias_bomb_in_process_and_merge_keys(tmp_path: Path) -> None:
    assert "expands to more than 100000 values" in _refused(_write(tmp_path, "b.yaml", BOMB))
    merge = "a0: &a0 {k0: 1, k1: 1}\n" + "".join(
        f"a{i}: &a{i} {{<<: [*a{i - 1}], x{i}: " + "[" + ", ".join([f"*a{i - 1}"] * 9) + "]}\n"
        for i in range(1, 10)
    )
    assert "expands to more than" in _refused(_write(tmp_path, "m.yaml", merge))


def test_small_aliases_still_work(tmp_path: Path) -> None:
    text = "shared: &h [16, 16]\nmodel: {name: mlp, kwargs: {hidden: *h}}\n"
    raw = _write(tmp_path, "ok.yaml", text)
    with pytest.raises(ConfigError, match="unknown key 'shared'"):
        load_config(raw)
    ok = _write(tmp_path, "ok2.yaml", "model: {name: mlp, kwargs: &k {hidden: [16, 16]}}\n")
    assert load_config(ok).model.kwargs == {"hidden": [16, 16]}


def test_alias_expansion_is_counted_while_composing(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.config import yaml_io as config_yaml

    with pytest.raises(config_yaml.YamlLimitError, match="expands to more than"):
        config_yaml.load_text(BOMB, "bomb")
    monkeypatch.setattr(config_yaml, "MAX_NODES", 300)
    # Exactly at the limit is fine: 1 root + 1 key + 1 list node + 297 scalars.
    assert len(config_yaml.load_text("k: [" + ",".join(["1"] * 297) + "]", "x")["k"]) == 297
    with pytest.raises(config_yaml.YamlLimitError):
        config_yaml.load_text("k: [" + ",".join(["1"] * 298) + "]", "x")
    # Each alias counts as its whole node (3 values): 7 + 97 * 3 = 298 fits, 7 + 98 * 3 does not.
    aliased = "k: &a [1, 2]\nv: [{}]"
    assert config_yaml.load_text(aliased.format(",".join(["*a"] * 97)), "x")
    with pytest.raises(config_yaml.YamlLimitError):
        config_yaml.load_text(aliased.format(",".join(["*a"] * 98)), "x")


def test_alias_cycle_is_refused(tmp_path: Path) -> None:
    assert "cycle" in _refused(_write(tmp_path, "c.yaml", "model: {kwargs: &x {a: [*x]}}\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested deeper than 64"),
        ("".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n", "deeper"),
        ("seed: " + "9" * 5000 + "\n", "bad value in"),
        ("# " + "x" * (2 << 20) + "\n", "larger than 1024 KiB"),
        ("", "is empty"),
        ("# only a comment\n\n", "is empty"),
    ],
    ids=["deep-flow", "deep-block", "huge-int", "too-large", "empty", "comments"],
)
def test_hostile_files_are_one_line_errors_naming_the_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _write(tmp_path, "hostile.yaml", text)
    message = _refused(path)
    assert expected in message and str(path) in message


def test_invalid_utf8_names_the_file_and_offset(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", b"name: caf\xe9\n")
    message = _refused(path)
    assert str(path) in message and "not UTF-8" in message and "offset 9" in message


def test_devices_and_fifos_are_refused_without_reading(tmp_path: Path) -> None:
    assert "not a regular YAML file" in _refused(Path("/dev/zero"))
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    assert "is a FIFO" in _refused(fifo)


def test_cli_dev_zero_fifo_and_empty_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    empty = _write(tmp_path, "empty.yaml", "")
    for path, needle in (("/dev/zero", "not a regular"), (fifo, "FIFO"), (empty, "is empty")):
        proc, seconds, _ = _kiln_measured("train", str(path), cwd=tmp_path)
        _assert_cli_refused(proc, str(path), needle)
        assert seconds < 10
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------- overrides and values


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=.inf", "optim.lr: inf is not a finite number"),
        ("optim.lr=nan", "optim.lr: Input should be a finite number"),
        ("optim.lr=1e400", "optim.lr: Input should be a finite number"),
        ("optim.betas=[0.9, .nan]", "optim.betas: nan is not a finite number"),
        ("model.kwargs.width=[1, -.inf]", "model.kwargs: -inf is not a finite number"),
        ("optim.lr_mult={head: .inf}", "optim.lr_mult: inf is not a finite number"),
        ("seed=1180591620717411303424", "seed: 1180591620717411303424 does not fit"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("data.batch_size=1e23", "data.batch_size: Input should be a valid integer"),
        ("data.batch_size=100000000000", "data.batch_size: Input should be less than or equal"),
        ("data.num_workers=100000", "data.num_workers: Input should be less than or equal"),
        ("data.image_size=1000000", "data.image_size: Input should be less than or equal"),
        ("data.synthetic.n_samples=10000000000", "less than or equal to 10000000"),
        ("train.epochs=10000000000", "train.epochs: Input should be less than or equal"),
        ("model.kwargs.w=99999999999999999999", "model.kwargs: 99999999999999999999 does not"),
        ("model.kwargs.w=" + "[" * 100 + "]" * 100, "nested deeper than 64"),
        ("a" + ".a" * 100 + "=1", "nested deeper than 64"),
        ("model.kwargs.w=" + "9" * 5000, "override model.kwargs.w= value"),
        ("name=", "name: the run name must be a non-empty folder name"),
        ("name=.", "must be a non-empty folder name"),
        ("name=..", "must be a non-empty folder name"),
        ("name=../../x", "the run name contains '/'"),
        ("name=a\\b", "the run name contains '\\\\'"),
        ("name=a\0b", "the run name contains"),
        ("out_dir=", "out_dir must name a folder"),
    ],
)
def test_out_of_range_and_bad_names_are_refused(override: str, expected: str) -> None:
    assert expected in _refused(None, [override])


def test_numbers_inside_free_form_values_are_checked() -> None:
    assert "model.kwargs: inf is not a finite" in _refused(None, ["model.kwargs.w=[1, .inf]"])
    assert "does not fit in a 64-bit" in _refused(None, ["model.kwargs.w={a: 9223372036854775808}"])
    assert load_config(None, ["model.kwargs.w=9223372036854775807"]).model.kwargs["w"] == 2**63 - 1


def test_seed_fits_numpy_and_scikit_learn() -> None:
    assert "seed: Input should be less than or equal" in _refused(None, ["seed=4294967296"])
    assert "data.split_seed: Input should be greater" in _refused(None, ["data.split_seed=-1"])


def test_error_message_of_a_huge_value_is_short() -> None:
    from kiln.config import validate

    with pytest.raises(ConfigError) as info:
        validate({"optim": {"betas": list(range(10**6))}, "freeze": {"modules": [[1]] * 10**5}})
    message = str(info.value)
    assert "optim.betas" in message and "list of 1000000 items" in message
    assert len(message) < 3000 and "more problems" in message


def test_override_alias_bomb_is_refused() -> None:
    tree = "[" + ", ".join(["1"] * 10) + "]"
    value = f"[&a0 {tree}, " + ", ".join(
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)
    )
    assert "expands to more than" in _refused(None, [f"model.kwargs.w={value}]"])


def test_valid_edges_still_load() -> None:
    cfg = load_config(
        None, ["seed=4294967295", "name=my run", "out_dir=.", "optim.lr=1e-300", "name=x.y"]
    )
    assert cfg.seed == 2**32 - 1 and cfg.name == "x.y" and cfg.out_dir == "."


def test_cli_bad_name_creates_nothing(tmp_path: Path) -> None:
    proc, _, _ = _kiln_measured("train", "name=../../escape", cwd=tmp_path)
    _assert_cli_refused(proc, "name")
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "escape").exists()


def test_model_larger_than_memory_is_refused_before_a_run_dir(make_cfg, tmp_path: Path) -> None:
    from kiln.errors import ModelError
    from kiln.train.trainer import Trainer

    cfg = make_cfg("model.kwargs.hidden=[2000000, 2000000]", "name=huge")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"GiB of parameters, more than the .* available"):
        Trainer(cfg, verbose=False)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------- resume


def _tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def short_run(make_cfg) -> Path:
    from kiln.train.trainer import Trainer

    trainer = Trainer(make_cfg("train.epochs=1", "train.max_steps=3", "name=r"), verbose=False)
    trainer.fit()
    return trainer.run_dir


def test_resume_with_changed_keys_is_refused_and_changes_nothing(make_cfg, short_run: Path):
    from kiln.train.trainer import Trainer

    before = _tree_hash(short_run)
    over = [f"resume={short_run}", "data.batch_size=7", "optim.name=sgd", "train.max_steps=6"]
    with pytest.raises(ConfigError) as info:
        Trainer(make_cfg("train.epochs=1", *over), verbose=False)
    message = str(info.value)
    assert "data.batch_size: 64 -> 7" in message and "optim.name: 'adamw' -> 'sgd'" in message
    assert "train.max_steps" not in message.split("would change")[1].split(". Resume")[0]
    assert _tree_hash(short_run) == before


def test_resume_that_extends_is_recorded_and_keeps_provenance(make_cfg, short_run: Path):
    from kiln.train.trainer import Trainer

    config_before = (short_run / "config.yaml").read_text()
    resumed = Trainer(
        make_cfg("train.epochs=1", "train.max_steps=5", f"resume={short_run}"), verbose=False
    )
    assert resumed.step == 3
    resumed.fit()
    assert (short_run / "config.yaml").read_text() == config_before
    entries = [json.loads(x) for x in (short_run / "resumes.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["step"] == 3
    assert entries[0]["changes"] == {"train.max_steps": [3, 5]}
    # The next resume compares with the extended run: max_steps=5 is no change any more.
    again = Trainer(
        make_cfg("train.epochs=1", "train.max_steps=7", f"resume={short_run}"), verbose=False
    )
    again.fit()
    entries = [json.loads(x) for x in (short_run / "resumes.jsonl").read_text().splitlines()]
    assert entries[-1]["changes"] == {"train.max_steps": [5, 7]}
    assert (short_run / "config.yaml").read_text() == config_before


def test_cli_resume_with_changed_batch_size_lists_it(short_run: Path, tmp_path: Path) -> None:
    before = _tree_hash(short_run)
    proc, _, _ = _kiln_measured(
        "train", f"resume={short_run}", "data.batch_size=7", "train.epochs=2", cwd=tmp_path
    )
    # Without a config file, the run's own config.yaml is the base: only the override differs.
    _assert_cli_refused(proc, "trains: data.batch_size: 64 -> 7. Resume")
    assert _tree_hash(short_run) == before


def test_config_error_is_exit_2_one_line_for_a_valid_config_type() -> None:
    assert isinstance(load_config(None, []), Config)

"""Files from others run no code: forged ``model.target`` and pickled ``.pt2`` entries.

One tiny run is trained per module and copied; each copy gets one forged file whose payload
would create a marker file if anything called it. Every verb that reads that file must refuse
it with exit 2 and one line naming the import path and ``--trust-code``, and the marker must
never appear. A run trained on the user's own class stays usable with the opt-in, and a target
that is not a model is refused uncalled even with it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from runners import run_kiln
from training import train_digits_mlp

import kiln
from kiln.errors import ModelError, UnsafeFileError
from kiln.trust import check_pt2

SYSTEM = "os:system"


def _payload(target: str, marker: Path) -> dict[str, Any]:
    """A ``model`` config section whose target would create ``marker`` if it were called."""
    kwargs = {
        "os:system": {"command": f"touch {marker}"},
        "subprocess:getoutput": {"cmd": f"touch {marker}"},
        "builtins:exec": {"source": f"open({str(marker)!r}, 'w').close()"},
        "subprocess:Popen": {"args": ["touch", str(marker)]},
    }[target]
    return {"name": "mlp", "target": target, "kwargs": kwargs}


def forge_weights(file: Path, target: str, marker: Path, **extra: str) -> None:
    """Rewrite ``file``'s ``kiln_config`` metadata to name ``target``; tensors unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
    cfg = yaml.safe_load(meta["kiln_config"])
    cfg["model"] = _payload(target, marker)
    meta["kiln_config"] = yaml.safe_dump(cfg)
    meta.update(extra)
    save_file(load_file(str(file)), str(file), metadata=meta)


def forge_config(run: Path, target: str, marker: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = _payload(target, marker)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def forge_checkpoint(file: Path, target: str, marker: Path) -> None:
    saved = torch.load(file, weights_only=True)
    saved["config"]["model"] = _payload(target, marker)
    torch.save(saved, file)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits_mlp(tmp_path_factory.mktemp("untrusted"), "name=clean")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder for this test's run copies; also the CLI's working directory."""
    return tmp_path


def _copy(trained: Path, work: Path, name: str = "run") -> Path:
    dest = work / name
    shutil.copytree(trained, dest, symlinks=True)
    return dest


def _checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*.ckpt"))[-1]


def assert_refused(proc: subprocess.CompletedProcess[str], target: str, marker: Path) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert target in lines[0] and "--trust-code" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------- model.target read from files

WEIGHT_VERBS = {
    "serve": ["serve", "{run}", "--port", "0"],
    # The supervisor keeps the worker's exit 2 and its one line (not one line per worker).
    "serve-workers": ["serve", "{run}", "--port", "0", "--workers", "2"],
    "eval": ["eval", "{run}"],
    "eval-ensemble": ["eval", "{run}", "{run}"],
    "export": ["export", "{run}", "--format", "exported"],
    "quantize": ["quantize", "{run}", "--method", "dynamic"],
    "inspect": ["inspect", "{run}"],
    "prune": ["prune", "{run}", "--finetune-epochs", "0"],
}


@pytest.mark.parametrize("verb", list(WEIGHT_VERBS))
def test_verbs_refuse_a_target_in_the_weights_metadata(trained: Path, work: Path, verb: str):
    run, marker = _copy(trained, work), work / "MARKER"
    forge_weights(run / "model.safetensors", SYSTEM, marker)
    args = [a.format(run=run) for a in WEIGHT_VERBS[verb]]
    assert_refused(run_kiln(*args, cwd=work, timeout=60), SYSTEM, marker)


def test_consolidate_refuses_a_target_in_the_checkpoint(trained: Path, work: Path) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    ckpt = _checkpoint(run)
    forge_checkpoint(ckpt, SYSTEM, marker)
    out = work / "out.safetensors"
    assert_refused(run_kiln("consolidate", str(ckpt), "--out", str(out), cwd=work), SYSTEM, marker)
    assert not out.exists()


@pytest.mark.parametrize("forged", ["checkpoint", "config"])
def test_eval_checkpoint_refuses_a_target(trained: Path, work: Path, forged: str) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    ckpt = _checkpoint(run)
    if forged == "checkpoint":
        forge_checkpoint(ckpt, SYSTEM, marker)
    else:
        forge_config(run, SYSTEM, marker)
    proc = run_kiln("eval", str(run), "--checkpoint", str(ckpt), cwd=work)
    assert_refused(proc, SYSTEM, marker)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{run}", "--snapshots", "1"],
        ["prune", "{run}", "--rewind"],
        ["train", "resume={run}", "train.epochs=2"],  # no config given: the run's own is read
        ["doctor", "{run}"],  # a run directory stands for its config.yaml (also profile, bench)
    ],
    ids=["eval-snapshots", "prune-rewind", "train-resume", "doctor"],
)
def test_verbs_that_rebuild_from_the_run_config_refuse_a_target(
    trained: Path, work: Path, args: list[str]
) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    forge_config(run, SYSTEM, marker)
    proc = run_kiln(*[a.format(run=run) for a in args], cwd=work)
    assert_refused(proc, SYSTEM, marker)


@pytest.mark.parametrize("target", [SYSTEM, "subprocess:getoutput", "builtins:exec"])
def test_load_model_refuses_a_target_in_the_metadata(trained: Path, work: Path, target: str):
    run, marker = _copy(trained, work), work / "MARKER"
    forge_weights(run / "model.safetensors", target, marker)
    with pytest.raises(UnsafeFileError, match=f"{target}.*--trust-code.*trust_code=True"):
        kiln.load_model(run / "model.safetensors")
    with pytest.raises(UnsafeFileError, match=target):
        kiln.load_model(run)
    assert not marker.exists()


def test_python_loaders_refuse_a_target(trained: Path, work: Path) -> None:
    from kiln.algorithms.ensemble import load_ensemble, load_snapshots
    from kiln.train.checkpoint.weights import consolidate_checkpoint

    run, marker = _copy(trained, work), work / "MARKER"
    forge_weights(run / "model.safetensors", SYSTEM, marker)
    forge_checkpoint(_checkpoint(run), SYSTEM, marker)
    with pytest.raises(UnsafeFileError, match=SYSTEM):
        load_ensemble([run, run])
    with pytest.raises(UnsafeFileError, match=SYSTEM):
        consolidate_checkpoint(_checkpoint(run))
    forge_config(run, SYSTEM, marker)
    with pytest.raises(UnsafeFileError, match=SYSTEM):
        load_snapshots(run, 1)
    assert not marker.exists()


def test_quantized_and_pruned_loaders_refuse_a_target(trained: Path, work: Path) -> None:
    """Their files carry the run's config too (``kiln_quant``/``kiln_pruned`` mark them)."""
    from kiln.compress.prune.core import load_pruned
    from kiln.compress.quantize.core import load_quantized

    marker = work / "MARKER"
    quantized = _copy(trained, work, "quantized") / "model.safetensors"
    forge_weights(quantized, SYSTEM, marker, kiln_quant=json.dumps({"method": "dynamic"}))
    with pytest.raises(UnsafeFileError, match=f"{SYSTEM}.*--trust-code"):
        load_quantized(quantized)
    pruned = _copy(trained, work, "pruned") / "model.safetensors"
    forge_weights(pruned, SYSTEM, marker, kiln_pruned=json.dumps({"widths": {}}))
    with pytest.raises(UnsafeFileError, match=f"{SYSTEM}.*--trust-code"):
        load_pruned(pruned)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", [SYSTEM, "builtins:exec", "subprocess:getoutput", "subprocess:Popen"]
)
def test_a_target_that_is_not_a_model_is_refused_uncalled_even_with_trust(
    trained: Path, work: Path, target: str
) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    forge_weights(run / "model.safetensors", target, marker)
    with pytest.raises(ModelError, match=f"{target}.*refused without calling it"):
        kiln.load_model(run, trust_code=True)
    assert not marker.exists()
    proc = run_kiln("eval", str(run), "--trust-code", cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and target in proc.stderr
    assert not marker.exists()


def test_a_checkpoint_target_that_is_not_a_model_is_refused_even_with_trust(
    trained: Path, work: Path
) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    ckpt = _checkpoint(run)
    forge_checkpoint(ckpt, SYSTEM, marker)
    proc = run_kiln("consolidate", str(ckpt), "--trust-code", cwd=work)
    assert proc.returncode == 2 and SYSTEM in proc.stderr, proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------- the user's own class


def test_a_target_the_user_named_themselves_needs_no_opt_in() -> None:
    from kiln.trust import refuse_file_target

    refuse_file_target("mypkg:Net", "run/config.yaml", trust_code=False, chosen=["mypkg:Net"])
    with pytest.raises(UnsafeFileError, match="mypkg:Other"):
        refuse_file_target("mypkg:Other", "run/config.yaml", trust_code=False, chosen=["mypkg:Net"])


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained on the user's own class (``usermodels:TinyNet``, on the test path)."""
    return train_digits_mlp(
        tmp_path_factory.mktemp("own"),
        "name=own",
        "model.target=usermodels:TinyNet",
        "model.kwargs={}",
    )


def test_own_target_needs_trust_and_works_with_it(own_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match=r"usermodels:TinyNet.*--trust-code"):
        kiln.load_model(own_run)
    model = kiln.load_model(own_run, trust_code=True)
    assert type(model).__name__ == "TinyNet"
    shape = json.loads((own_run / "data_info.json").read_text())["input_shape"]
    assert model(torch.zeros(2, *shape)).shape == (2, 10)

    refused = run_kiln("eval", str(own_run), cwd=tmp_path)
    assert refused.returncode == 2 and "usermodels:TinyNet" in refused.stderr
    assert "--trust-code" in refused.stderr
    trusted = run_kiln("eval", str(own_run), "--trust-code", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads((own_run / "eval-test.json").read_text())


def test_a_run_directory_given_to_doctor_profile_bench_needs_trust(own_run: Path) -> None:
    """``kiln doctor|profile|bench RUN`` read the run's config.yaml: its target needs the opt-in."""
    from kiln.cli.profile import load_job

    with pytest.raises(UnsafeFileError, match=r"usermodels:TinyNet.*--trust-code"):
        load_job([str(own_run)])
    cfg, _, _ = load_job([str(own_run)], trust_code=True)
    assert cfg.model.target == "usermodels:TinyNet"
    named = load_job([str(own_run), "model.target=usermodels:TinyNet"])[0]  # named by the user
    assert named.model.target == "usermodels:TinyNet"


def test_own_target_in_a_config_passed_on_the_command_line_needs_no_opt_in(
    tmp_path: Path,
) -> None:
    """``kiln inspect CONFIG`` with the user's own target: their choice, no --trust-code."""
    from runners import ROOT

    proc = run_kiln(
        "inspect",
        str(ROOT / "configs/digits_mlp.yaml"),
        "model.target=usermodels:TinyNet",
        "model.kwargs={}",
        f"out_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------- .pt2 entries that unpickle


class _Touch:
    """Unpickling this creates the marker file: a stand-in for any code an attacker runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine ``torch.export`` archive of a tiny model (what ``kiln export`` writes)."""
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), str(path))
    return path


def _rewrite(src: Path, dest: Path, edit: Any) -> None:
    """Copy the zip ``src`` to ``dest``, passing each (record, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            root, _, record = info.filename.partition("/")
            for name, data in edit(record, zin.read(info)):
                zout.writestr(f"{root}/{name}", data)


def _forge_pickled_weight(record: str, data: bytes, marker: Path) -> list[tuple[str, bytes]]:
    if record.endswith("_weights_config.json"):
        config = json.loads(data)
        for meta in config["config"].values():
            meta["use_pickle"] = True
        return [(record, json.dumps(config).encode())]
    if record.startswith("data/weights/weight_"):
        return [(record, pickle.dumps(_Touch(marker)))]
    return [(record, data)]


def _forge_sample_inputs(record: str, data: bytes, marker: Path) -> list[tuple[str, bytes]]:
    if record.startswith("data/sample_inputs/"):
        buf = io.BytesIO()
        torch.save(_Touch(marker), buf)
        return [(record, buf.getvalue())]
    return [(record, data)]


def _forge_native(record: str, data: bytes, marker: Path) -> list[tuple[str, bytes]]:
    extra = [("data/aotinductor/model/model.so", b"\x7fELF")] if record == "archive_version" else []
    return [(record, data), *extra]


FORGERIES = {
    "use_pickle weight": (_forge_pickled_weight, "use_pickle|stored as a pickle"),
    "sample inputs pickle": (_forge_sample_inputs, "weights_only=True"),
    "native code": (_forge_native, "native code"),
}


def test_genuine_pt2_passes_and_loads(pt2: Path) -> None:
    from kiln.deploy.export import load_exported

    check_pt2(pt2)
    assert load_exported(pt2, "exported")(torch.zeros(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("kind", list(FORGERIES))
def test_pt2_with_entries_that_unpickle_is_refused(pt2: Path, tmp_path: Path, kind: str) -> None:
    from kiln.compress.quantize.pt2e import load_pt2e
    from kiln.deploy.export import load_exported

    forge, why = FORGERIES[kind]
    marker, bad = tmp_path / "MARKER", tmp_path / "bad.pt2"
    _rewrite(pt2, bad, lambda r, d: forge(r, d, marker))
    with pytest.raises(UnsafeFileError, match=f"(?s)bad.pt2.*({why}).*--trust-code"):
        load_exported(bad, "exported")
    with pytest.raises(UnsafeFileError, match="--trust-code"):
        load_pt2e(bad)
    assert not marker.exists()


def test_serve_refuses_a_pickled_pt2(trained: Path, work: Path, pt2: Path) -> None:
    run, marker = _copy(trained, work), work / "MARKER"
    bad = run / "bad.pt2"  # data_info.json in a parent folder: serve finds its data description
    _rewrite(pt2, bad, lambda r, d: _forge_pickled_weight(r, d, marker))
    proc = run_kiln("serve", str(bad), "--port", "0", cwd=work, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-code" in lines[0] and "bad.pt2" in lines[0], lines
    assert not marker.exists()

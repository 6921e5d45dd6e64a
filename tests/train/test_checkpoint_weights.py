"""model.safetensors and rebuilding a model (kiln.train.checkpoint.weights), without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import run
from kiln.config import load_config
from kiln.data.base import DataInfo
from kiln.registry import build_model
from kiln.train.checkpoint import CheckpointManager
from kiln.train.checkpoint.weights import (
    consolidate_checkpoint,
    load_model,
    model_from_metadata,
    save_weights,
)

INFO = DataInfo(task="classification", input_shape=(4,), num_classes=3)


def _run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run directory with its config, input contract and weights, as a finished fit leaves it."""
    cfg = load_config(None, ["model.name=mlp", "model.kwargs.hidden=[5]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, INFO)
    d = tmp_path / "run"
    d.mkdir()
    run.write_run_files(d, cfg, INFO)
    save_weights(model, d / run.WEIGHTS, cfg, INFO)
    return d, model


def test_load_model_rebuilds_the_same_network(tmp_path: Path) -> None:
    d, model = _run(tmp_path)
    loaded = load_model(d)
    assert not loaded.training  # eval mode
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(load_model(d / run.WEIGHTS)(x), model(x), rtol=0, atol=0)


def test_load_model_into_a_given_instance(tmp_path: Path) -> None:
    d, model = _run(tmp_path)
    torch.manual_seed(1)
    target = build_model(run.read_config(d).model, INFO)
    assert load_model(d, model=target) is target
    for mine, saved in zip(target.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(mine, saved, rtol=0, atol=0)


def test_load_model_without_weights_says_the_run_may_not_have_finished(tmp_path: Path) -> None:
    d, _ = _run(tmp_path)
    (d / run.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="may not have finished: resume it"):
        load_model(d)


def test_the_metadata_carries_the_input_contract(tmp_path: Path) -> None:
    from kiln.safeio.tensorfile import read_header

    d, _ = _run(tmp_path)
    _, meta = read_header(d / run.WEIGHTS)
    assert run.data_info_from_json(meta["kiln_data_info"]) == INFO
    model = model_from_metadata(d / run.WEIGHTS, meta, trust_code=False)
    assert sum(p.numel() for p in model.parameters()) == 4 * 5 + 5 + 5 * 3 + 3
    with pytest.raises(ValueError, match="has no Kiln metadata; pass model="):
        model_from_metadata(d / run.WEIGHTS, {}, trust_code=False)


def test_consolidate_a_checkpoint_of_the_run(tmp_path: Path) -> None:
    d, model = _run(tmp_path)
    cfg = run.read_config(d)
    ckpts = CheckpointManager(d / run.CHECKPOINTS)
    path = ckpts.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, step=3)
    out = tmp_path / "again.safetensors"
    weights = consolidate_checkpoint(path, out=out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(load_model(out)(x), model.eval()(x), rtol=0, atol=0)

    (d / run.DATA_INFO).unlink()
    with pytest.raises(FileNotFoundError, match="must sit in its run's checkpoints/"):
        consolidate_checkpoint(path)

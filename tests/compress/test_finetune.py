"""finetune_in_run: the one Trainer fine-tune behind QAT and pruning cycles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kiln.train.trainer as trainer_module
from kiln.compress.finetune import finetune_in_run
from kiln.train.build import build_data_for


def test_the_model_ends_with_the_weights_the_run_kept(
    make_cfg,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_cfg("train.epochs=1", "train.max_steps=3", "checkpoint.every_epoch=false")
    data = build_data_for(cfg)
    from kiln.registry import build_model

    model = build_model(cfg.model, data.info)
    fit = trainer_module.Trainer.fit

    def fit_then_drift(self):  # type: ignore[no-untyped-def]
        result = fit(self)
        with torch.no_grad():  # what a last epoch that is worse than the best looks like
            for p in model.parameters():
                p.add_(1.0)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit_then_drift)
    result = finetune_in_run(cfg, model, data, tmp_path / "ft")
    assert result.run_dir == tmp_path / "ft"
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0, msg=name)


def test_kept_weights_load_through_shared_names_and_refuse_another_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torch import nn

    from kiln.compress.finetune import _load_kept
    from kiln.errors import ModelError

    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one tensor under two names each
    file = tmp_path / "w.safetensors"
    save_file({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, str(file))
    _load_kept(model, file)
    assert torch.equal(model[2].weight, torch.ones(2, 2))
    save_file({"0.weight": torch.ones(2, 2)}, str(file))
    with pytest.raises(ModelError, match=r"missing \['0.bias', '2.bias'\]"):
        _load_kept(model, file)
    save_file(
        {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2), "x": torch.ones(1)}, str(file)
    )
    with pytest.raises(ModelError, match=r"unexpected \['x'\]"):
        _load_kept(model, file)

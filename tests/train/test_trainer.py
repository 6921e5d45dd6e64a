"""Trainer end to end: accuracy goals, accumulation through the loop, user models, smoke runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runners import ROOT

import kiln
from kiln.data.loader import EpochSampler, make_loader, start_epoch
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.trainer import Trainer

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_smoke_runs(path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # configs name data files relative to the repository root
    common = [f"out_dir={tmp_path}", "log.tensorboard=false", "log.progress=false"]
    if kiln.load_config(path).meta.enabled:  # a meta-learning job: its own loop
        from kiln.meta.runner import run_meta

        summary = run_meta(kiln.load_config(path, [*common, "meta.meta_steps=4"]), verbose=False)
        assert summary["meta_steps"] == 4
        assert (Path(summary["run_dir"]) / "summary.json").is_file()
        with pytest.raises(ValueError, match=r"meta\.enabled"):
            Trainer(kiln.load_config(path, common), verbose=False)
        return
    cfg = kiln.load_config(path, ["train.max_steps=4", *common])
    pretrained = cfg.model.pretrained
    if pretrained and pretrained.startswith("runs/"):  # another shipped job makes the weights
        source = ROOT / "configs" / f"{Path(pretrained).name}.yaml"
        first = kiln.load_config(source, ["train.max_steps=4", *common])
        src = Trainer(first, verbose=False).fit().run_dir
        cfg = kiln.load_config(path, ["train.max_steps=4", *common, f"model.pretrained={src}"])
    result = Trainer(cfg, verbose=False).fit()
    assert result.steps == 4
    assert (result.run_dir / "model.safetensors").is_file()
    assert result.test and all(v == v for v in result.test.values())  # no NaN metrics


def test_accumulation_through_the_trainer_equals_big_batches(make_cfg) -> None:
    # The sampler's order does not depend on the batch size, so 4 x 10 == 1 x 40 exactly
    # (up to float summation order), including the short last group of each epoch.
    common = ("optim.name=sgd", "optim.momentum=0.9", "train.epochs=2", "data.val_fraction=0.1")
    a = Trainer(
        make_cfg(*common, "data.batch_size=10", "train.accumulate=4", "name=a"), verbose=False
    )
    b = Trainer(make_cfg(*common, "data.batch_size=40", "name=b"), verbose=False)
    assert a.n_batches % 4 != 0  # a partial last group exists
    a.fit()
    b.fit()
    assert a.step == b.step == a.engine.updates
    torch.testing.assert_close(
        a.engine.model.state_dict(), b.engine.model.state_dict(), rtol=1e-5, atol=1e-6
    )


def test_epoch_sampler_resumes_mid_epoch() -> None:
    full = list(EpochSampler(50, shuffle=True, seed=3).__iter__())
    s = EpochSampler(50, shuffle=True, seed=3)
    s.set_epoch(0, start=20)
    assert list(s) == full[20:]
    s.set_epoch(1)
    assert sorted(s) == list(range(50)) and list(s) != full
    ds = kiln.DataBundle  # noqa: F841 - import check of the lazy API
    loader = make_loader(
        torch.utils.data.TensorDataset(torch.arange(10)), batch_size=4, shuffle=False
    )
    start_epoch(loader, 0, batches_done=1)
    assert [b[0].tolist() for b in loader] == [[4, 5, 6, 7], [8, 9]]


def test_user_model_and_dataset_from_python(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    result = kiln.fit(
        model=model,
        data=ds,
        config={
            "out_dir": str(tmp_path),
            "train": {"epochs": 15},
            "optim": {"lr": 0.01},
            "log": {"tensorboard": False, "progress": False},
        },
        verbose=False,
    )
    assert result.test["acc"] > 0.9
    reloaded = kiln.load_model(
        result.run_dir,
        model=torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
    )
    best = load_checkpoint(result.best_checkpoint)["model"]
    torch.testing.assert_close(reloaded.state_dict(), best)


def test_user_model_by_import_path_trains(make_cfg) -> None:
    cfg = make_cfg(
        "model.target=usermodels:TinyNet",
        "model.kwargs={scale: 1.0}",
        "train.epochs=5",
        "optim.lr=0.01",
    )
    result = Trainer(cfg, verbose=False).fit()
    assert result.test["acc"] > 0.9
    model = kiln.load_model(result.run_dir, trust_code=True)  # the run's own import path
    assert type(model).__name__ == "TinyNet" and not model.training


def test_load_model_rebuilds_tied_gpt(make_cfg, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, kiln trains small models. " * 40)
    cfg = make_cfg(
        "data.name=text",
        f"data.path={corpus}",
        "data.text.block_size=16",
        "model.name=gpt",
        "model.kwargs={n_layer: 1, n_embd: 32, n_head: 2}",
        "train.max_steps=3",
    )
    result = Trainer(cfg, verbose=False).fit()
    model = kiln.load_model(result.run_dir)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert "perplexity" in result.test


def test_deterministic_flag(make_cfg) -> None:
    try:
        Trainer(make_cfg("deterministic=true", "train.max_steps=1"), verbose=False)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_metrics_and_tensorboard_written(make_cfg) -> None:
    cfg = make_cfg("log.tensorboard=true", "train.log_every=5", "train.epochs=1")
    result = Trainer(cfg, verbose=False).fit()
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss"' in line for line in lines)
    assert any('"val/acc"' in line for line in lines) and any(
        '"test/acc"' in line for line in lines
    )
    assert list((result.run_dir / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_default_digits_job_reaches_98_percent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = kiln.load_config(
        ROOT / "configs/digits.yaml",
        [f"out_dir={tmp_path}", "log.tensorboard=false", "log.progress=false"],
    )
    assert cfg.precision == "bf16" and cfg.model.name == "resnet"
    result = Trainer(cfg, verbose=False).fit()
    # Seeds 0-4 give 98.6-99.4% (354-357 of 359 test digits; 352 clear the bar), one or two
    # threads: the job trains long enough (24 epochs, label smoothing) that this is not luck.
    assert result.test["acc"] >= 0.98


@pytest.mark.slow
def test_bf16_mlp_reaches_97_percent(tmp_path: Path) -> None:
    cfg = kiln.load_config(
        ROOT / "configs/digits_mlp.yaml",
        ["precision=bf16", f"out_dir={tmp_path}", "log.tensorboard=false", "log.progress=false"],
    )
    result = Trainer(cfg, verbose=False).fit()
    assert result.test["acc"] >= 0.97


@pytest.mark.slow
def test_compile_matches_eager_and_saves_unwrapped_keys(make_cfg) -> None:
    eager = Trainer(make_cfg("train.max_steps=4", "name=e"), verbose=False)
    eager.fit()
    comp = Trainer(make_cfg("train.max_steps=4", "compile=true", "name=c"), verbose=False)
    comp.fit()
    state = load_checkpoint(resolve_checkpoint(comp.run_dir))["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)
    eager_state = {k: v.cpu() for k, v in eager.engine.model.state_dict().items()}
    torch.testing.assert_close(state, eager_state, rtol=1e-4, atol=1e-5)


def test_channels_last_matches_default(make_cfg) -> None:
    # CPU: on a GPU cudnn.benchmark may pick other conv algorithms per layout, and Adam turns
    # their rounding into 1e-3 weight differences within 3 steps.
    common = (
        "device=cpu",
        "model.name=resnet",
        "model.kwargs={depths: [1], width: 8}",
        "train.max_steps=3",
    )
    a = Trainer(make_cfg(*common, "name=a"), verbose=False)
    a.fit()
    b = Trainer(make_cfg(*common, "channels_last=true", "name=b"), verbose=False)
    b.fit()
    conv = b.engine.model.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # Different conv kernels sum in another order; Adam amplifies tiny gradient differences.
    torch.testing.assert_close(
        b.engine.model.state_dict(), a.engine.model.state_dict(), rtol=1e-3, atol=1e-4
    )


def test_loader_workers_give_the_same_run(make_cfg) -> None:
    a = Trainer(make_cfg("train.epochs=1", "name=a"), verbose=False)
    a.fit()
    b = Trainer(
        make_cfg("train.epochs=1", "data.num_workers=2", "data.persistent_workers=true", "name=b"),
        verbose=False,
    )
    b.fit()
    for k, v in a.engine.model.state_dict().items():
        assert torch.equal(v, b.engine.model.state_dict()[k]), k


@pytest.mark.parametrize("drop_last", [False, True])
def test_array_loader_yields_the_dataloader_batches(drop_last: bool) -> None:
    from torch.utils.data import Subset

    from kiln.data.base import ArrayDataset
    from kiln.data.loader import ArrayLoader

    base = ArrayDataset(torch.randn(103, 3), torch.arange(103))
    ds = Subset(Subset(base, list(range(3, 100))), list(range(0, 97, 1))[::-1])
    fast = make_loader(ds, batch_size=8, shuffle=True, seed=5, drop_last=drop_last)
    slow = make_loader(ds, batch_size=8, shuffle=True, seed=5, drop_last=drop_last, fast=False)
    assert isinstance(fast, ArrayLoader) and not isinstance(slow, ArrayLoader)
    for epoch, skip in ((0, 0), (1, 3), (2, 11)):
        start_epoch(fast, epoch, skip)
        start_epoch(slow, epoch, skip)
        a, b = list(fast), list(slow)
        assert len(a) == len(b) == len(fast) == len(slow)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


class _EarlyStop:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.seen.append(("start", epoch))

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self.seen.append(("end", epoch))
        assert metrics["epoch"] == epoch  # the README's numbering: epochs done
        if epoch == 1:
            trainer.request_stop("early stopping")


def test_callback_stop_ends_the_run_normally(make_cfg) -> None:
    stop = _EarlyStop()
    trainer = Trainer(make_cfg("train.epochs=5"), callbacks=[stop], verbose=False)
    result = trainer.fit()
    assert trainer.epoch == 1
    assert stop.seen == [("start", 0), ("end", 1)]  # 0-based index in, epochs done out
    assert result.steps == trainer.updates_per_epoch
    assert (result.run_dir / "model.safetensors").is_file() and result.test


def test_max_steps_beyond_epochs_runs_to_max_steps(make_cfg) -> None:
    trainer = Trainer(make_cfg("train.epochs=1", "train.max_steps=50"), verbose=False)
    assert trainer.updates_per_epoch < 50
    assert trainer.fit().steps == 50


def test_failed_resume_changes_no_file_and_says_why(make_cfg, tmp_path: Path) -> None:
    import shutil

    from kiln.config import ConfigError
    from kiln.train.checkpoint import CheckpointError

    first = Trainer(make_cfg("train.max_steps=3", "name=r"), verbose=False)
    first.fit()
    before = (first.run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model\.kwargs\.hidden: \[32\] -> \[8\]"):
        Trainer(make_cfg("model.kwargs.hidden=[8]", f"resume={first.run_dir}"), verbose=False)
    assert (first.run_dir / "config.yaml").read_text() == before
    # A loose checkpoint has no run config to compare with: the shape check still says why.
    loose = tmp_path / "copy.ckpt"
    shutil.copy(resolve_checkpoint(first.run_dir), loose)
    with pytest.raises(CheckpointError, match=r"different model .*shape"):
        Trainer(make_cfg("model.kwargs.hidden=[8]", f"resume={loose}"), verbose=False)


def test_resume_from_a_loose_checkpoint_file_starts_a_new_run(make_cfg, tmp_path: Path) -> None:
    import shutil

    first = Trainer(make_cfg("train.max_steps=3", "name=orig"), verbose=False)
    first.fit()
    loose = tmp_path / "loose" / "copy.ckpt"
    loose.parent.mkdir()
    shutil.copy(resolve_checkpoint(first.run_dir), loose)
    again = Trainer(make_cfg("train.max_steps=5", "name=cont", f"resume={loose}"), verbose=False)
    assert again.run_dir.name == "cont" and again.step == 3
    assert not (tmp_path / "config.yaml").exists()


def test_padded_shards_resume_with_the_same_tail() -> None:
    for world in (2, 3):
        for rank in range(world):
            s = EpochSampler(11, shuffle=True, seed=0, rank=rank, world=world)
            full = s.order()
            per_rank_done = 2
            s.set_epoch(0, start=per_rank_done * world)
            assert torch.equal(s.order(), full[per_rank_done:])


def test_compile_keeps_the_ddp_wrapper() -> None:
    from kiln.train.engine import Engine

    engine = Engine(device="cpu", strategy="ddp", compile=True)  # a world of one
    try:
        model, _ = engine.setup(torch.nn.Linear(4, 2))
        assert hasattr(model, "no_sync")  # the compiled module wraps DDP, not the bare model
    finally:
        engine.close()

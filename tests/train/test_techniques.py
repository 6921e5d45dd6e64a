"""Training techniques wired into the Trainer: each proves its effect, not just that it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nan_models import NaNModel
from safetensors.torch import load_file
from torch import nn

from kiln.algorithms.ema import EMA
from kiln.algorithms.mixing import mixup_batch, smooth_soft, soft_cross_entropy
from kiln.config import Config
from kiln.data.base import DataBundle
from kiln.errors import UsageError
from kiln.train import build
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.guard import NonFiniteError
from kiln.train.microbatch import is_out_of_memory
from kiln.train.reproducibility import seed_everything
from kiln.train.trainer import Trainer


def _flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder:
    """Records the inputs the model sees in training (forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self.inputs.append(args[0].detach().clone())


def _data_and_model(cfg: Config) -> tuple[DataBundle, nn.Module]:
    data = build.build_data_for(cfg)
    return data, build.build_model_for(cfg, data.info)


# ---------------------------------------------------------------- mixup / label smoothing


def test_soft_targets_with_label_smoothing_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed = mixup_batch(torch.randn(6, 3), y, alpha=0.4, num_classes=4, generator=g)
    ours = F.cross_entropy(logits, mixed.targets, label_smoothing=0.1)  # what the trainer calls
    ref = soft_cross_entropy(logits, smooth_soft(mixed.targets, 0.1))
    torch.testing.assert_close(ours, ref)
    # linear in the targets: equals lam * CE(y) + (1 - lam) * CE(y[perm])
    lam, perm = mixed.lam, mixed.perm
    split = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(F.cross_entropy(logits, mixed.targets), split)


def test_trainer_mixup_feeds_mixed_batches_then_stops_mixing(make_cfg) -> None:
    cfg = make_cfg("mix.mixup_alpha=0.4", "mix.off_last_epochs=1", "train.epochs=2")
    data, model = _data_and_model(cfg)
    rec = Recorder(model)
    trainer = Trainer(cfg, model=model, data=data, verbose=False)
    raw: list[torch.Tensor] = []
    for epoch in range(2):  # the batches the loader gives, in the trainer's order
        from kiln.data.loader import start_epoch

        start_epoch(trainer.train_loader, epoch, 0)
        raw.extend(x.clone() for x, _ in trainer.train_loader)
    trainer.fit()
    n = trainer.n_batches
    assert len(rec.inputs) == 2 * n
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
    for i in range(n):  # epoch 1: every batch mixed exactly as mixup_batch with the seed
        y_dummy = torch.zeros(len(raw[i]), dtype=torch.long)
        expect = mixup_batch(raw[i], y_dummy, alpha=0.4, num_classes=10, generator=g).inputs
        torch.testing.assert_close(rec.inputs[i], expect, rtol=0, atol=0)
    for i in range(n, 2 * n):  # the last epoch trains on clean batches
        assert torch.equal(rec.inputs[i], raw[i])


def test_cutmix_on_flat_inputs_is_refused(make_cfg) -> None:
    with pytest.raises(ValueError, match="cutmix pastes image patches"):
        Trainer(make_cfg("mix.cutmix_alpha=1.0"), verbose=False)


def test_mixup_on_regression_is_refused(make_cfg) -> None:
    cfg = make_cfg("data.name=sklearn:diabetes", "mix.mixup_alpha=0.2")
    with pytest.raises(ValueError, match="classification task"):
        Trainer(cfg, verbose=False)


# ---------------------------------------------------------------- EMA


def test_ema_weights_are_validated_and_saved(make_cfg) -> None:
    cfg = make_cfg("ema.enabled=true", "ema.decay=0.9", "train.epochs=2")
    result = Trainer(cfg, verbose=False).fit()
    best = load_checkpoint(result.best_checkpoint)
    _, fresh = _data_and_model(cfg)
    fresh.load_state_dict(best["model"])
    ema = EMA(fresh)
    ema.load_state_dict(best["techniques"]["ema"])
    saved = load_file(result.run_dir / "model.safetensors")
    for name, t in ema.shadow.items():
        if name in saved:
            assert torch.equal(saved[name], t), name
    raw = best["model"]["fc.weight"]
    assert not torch.equal(saved["fc.weight"], raw)  # EMA weights, not the raw ones
    summary = (result.run_dir / "summary.json").read_text()
    assert "ema of the best checkpoint" in summary


# ---------------------------------------------------------------- SWA


class EpochWeights:
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self.weights.append(_flat_params(trainer.engine.model))
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


def test_swa_final_model_is_the_mean_of_averaged_epochs(make_cfg) -> None:
    cfg = make_cfg(
        "swa.enabled=true",
        "swa.start_epoch=2",
        "swa.lr=0.0005",
        "swa.anneal_epochs=0",
        "train.epochs=4",
        "optim.name=sgd",
        "optim.lr=0.05",
    )
    rec = EpochWeights()
    result = Trainer(cfg, callbacks=[rec], verbose=False).fit()
    saved = load_file(result.run_dir / "model.safetensors")
    for name in ("hidden.0.weight", "fc.weight", "fc.bias"):
        mean = torch.stack([w[name] for w in rec.weights[2:]]).mean(0)
        torch.testing.assert_close(saved[name], mean, rtol=1e-6, atol=1e-7)
    assert rec.lrs[2:] == [pytest.approx(0.0005)] * 2  # SWALR holds the SWA LR
    assert "swa average of 2 epochs" in (result.run_dir / "summary.json").read_text()


def test_swa_cut_by_max_steps_before_it_starts_is_the_users_error(make_cfg) -> None:
    # 2 epochs of batches < start_epoch=3: a KilnError (exit 2, one line), not "a bug in Kiln".
    cfg = make_cfg("swa.enabled=true", "swa.start_epoch=3", "train.epochs=6", "train.max_steps=3")
    with pytest.raises(UsageError, match=r"SWA averaged no epoch: training ended at train\.max_s"):
        Trainer(cfg, verbose=False).fit()


def test_swa_recomputes_batchnorm_statistics(make_cfg) -> None:
    cfg = make_cfg("model.kwargs.norm=batch", "swa.enabled=true", "train.epochs=2")
    trainer = Trainer(cfg, verbose=False)
    result = trainer.fit()
    saved = load_file(result.run_dir / "model.safetensors")
    # BN statistics of the averaged weights over the train split, recomputed by hand as
    # torch.optim.swa_utils.update_bn does: the equal-weight average of the batch statistics.
    _, model = _data_and_model(cfg)
    model.load_state_dict(saved)
    loader = build.loader_for(cfg, trainer.data.train, train=False, device=torch.device("cpu"))
    with torch.no_grad():
        means = [model.hidden[0](model.flatten(x)).mean(0) for x, _ in loader]
    expect = torch.stack(means).mean(0)
    torch.testing.assert_close(saved["hidden.1.running_mean"], expect, rtol=1e-5, atol=1e-6)
    assert not torch.equal(saved["hidden.1.running_mean"], torch.zeros(32))


# ---------------------------------------------------------------- freezing


def test_frozen_parameters_do_not_change_and_leave_the_optimizer(make_cfg) -> None:
    cfg = make_cfg("freeze.modules=[hidden]", "optim.weight_decay=0.1", "model.kwargs.norm=batch")
    trainer = Trainer(cfg, verbose=False)
    before = _flat_params(trainer.engine.model)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    frozen = dict(trainer.engine.model.named_parameters())
    assert not any(id(frozen[n]) in in_opt for n in frozen if n.startswith("hidden."))
    trainer.fit()
    after = _flat_params(trainer.engine.model)
    for k in before:
        if k.startswith("hidden."):  # weights and BN running statistics (kept in eval)
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_gradual_unfreezing_trains_the_group_from_its_epoch(make_cfg) -> None:
    cfg = make_cfg("freeze.modules=[hidden]", "freeze.unfreeze_at={1: [hidden]}")
    rec = EpochWeights()
    trainer = Trainer(cfg, callbacks=[rec], verbose=False)
    start = _flat_params(trainer.engine.model)
    trainer.fit()
    assert torch.equal(rec.weights[0]["hidden.0.weight"], start["hidden.0.weight"])
    assert not torch.equal(rec.weights[1]["hidden.0.weight"], start["hidden.0.weight"])
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == 4  # every tensor has optimizer state once unfrozen


def test_freeze_pattern_that_matches_nothing_lists_modules(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"matches no parameter.*top-level modules: fc, hidden"):
        Trainer(make_cfg("freeze.modules=[backbone]"), verbose=False)


# ---------------------------------------------------------------- early stopping


def test_early_stopping_ends_the_run_normally(make_cfg) -> None:
    cfg = make_cfg(
        "early_stop.enabled=true",
        "early_stop.patience=2",
        "early_stop.min_delta=100",  # nothing counts as an improvement after the first
        "train.epochs=10",
    )
    result = Trainer(cfg, verbose=False).fit()
    assert result.stopped is not None and "early stopping" in result.stopped
    assert result.steps == 3 * Trainer(cfg, verbose=False).updates_per_epoch
    assert result.test  # the normal end: best weights evaluated on the test split


# ---------------------------------------------------------------- non-finite policies


def _nan_trainer(make_cfg, *overrides: str, bad=(5,)) -> Trainer:
    cfg = make_cfg(*overrides, "train.epochs=2")
    data = build.build_data_for(cfg)
    model = NaNModel(bad)
    return Trainer(cfg, model=model, data=data, verbose=False)


def test_nonfinite_skip_skips_exactly_the_bad_update(make_cfg) -> None:
    trainer = _nan_trainer(make_cfg, "train.nonfinite=skip", "train.log_every=1")
    trainer.fit()
    assert trainer.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())
    assert trainer.step == trainer.total_steps


def test_nonfinite_ignore_lets_nan_through(make_cfg) -> None:
    trainer = _nan_trainer(make_cfg, "train.nonfinite=ignore")
    with pytest.raises(NonFiniteError, match=r"model\.safetensors was not written"):
        trainer.fit()  # the NaN weights are not written out (tests/train/test_nonfinite.py)
    assert not all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())


def test_nonfinite_stop_saves_and_names_the_step(make_cfg) -> None:
    trainer = _nan_trainer(make_cfg, "train.nonfinite=stop")
    with pytest.raises(NonFiniteError, match=r"at step 5 .*non-finite gradients in 4 param"):
        trainer.fit()
    saved = load_checkpoint(resolve_checkpoint(trainer.run_dir))
    assert saved["loop"]["step"] == 4  # the weights from before the bad update
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_nonfinite_stop_names_the_module(make_cfg) -> None:
    class PoisonAt:
        def on_update_end(self, trainer: Trainer, step: int) -> None:
            if step == 3:
                with torch.no_grad():
                    trainer.engine.model.hidden[0].weight[0, 0] = float("inf")

    trainer = Trainer(make_cfg(), callbacks=[PoisonAt()], verbose=False)
    with pytest.raises(NonFiniteError, match=r"first non-finite output in module 'hidden.0'"):
        trainer.fit()


def test_nonfinite_rollback_reloads_and_lowers_the_lr(make_cfg) -> None:
    trainer = _nan_trainer(
        make_cfg, "train.nonfinite=rollback", "checkpoint.every_n_steps=3", bad=(8,)
    )
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    trainer.fit()
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)
    assert trainer.step == trainer.total_steps
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())


def test_nonfinite_rollback_gives_up_after_max_rollbacks(make_cfg) -> None:
    trainer = _nan_trainer(
        make_cfg, "train.nonfinite=rollback", "train.max_rollbacks=2", bad=(3, 6, 9)
    )
    with pytest.raises(NonFiniteError, match="after 2 rollbacks"):
        trainer.fit()


# ---------------------------------------------------------------- auto-microbatch


class OOMAbove:
    """Makes the CPU allocator fail at the head for batches above ``limit``.

    The failure comes after the dropout layers have drawn their masks, so a replay that did not
    restore the RNG would train on other masks; the error is the one torch itself raises (a
    ``RuntimeError`` from the CPU allocator, not ``torch.OutOfMemoryError``).
    """

    def __init__(self, model: nn.Module, limit: int) -> None:
        self.limit, self.raised = limit, 0
        model.fc.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if module.training and len(args[0]) > self.limit:
            self.raised += 1
            torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: the allocator refuses


def test_cpu_allocator_failure_is_recognised_as_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert type(info.value) is RuntimeError  # not torch.OutOfMemoryError on CPU
    assert is_out_of_memory(info.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_auto_microbatch_halves_and_matches_a_small_batch_run(make_cfg) -> None:
    common = ("model.kwargs.dropout=0.2", "train.epochs=2", "train.nonfinite=ignore")
    cfg = make_cfg(*common, "data.batch_size=64", "train.auto_microbatch=true", "name=auto")
    seed_everything(cfg.seed)
    data, model = _data_and_model(cfg)
    oom = OOMAbove(model, 32)
    auto = Trainer(cfg, model=model, data=data, verbose=False)
    auto.fit()
    assert oom.raised == 1 and auto.micro == 2
    ref_cfg = make_cfg(*common, "data.batch_size=32", "train.accumulate=2", "name=ref")
    seed_everything(ref_cfg.seed)  # the same initial weights as the first run's
    ref_data, ref_model = _data_and_model(ref_cfg)
    ref = Trainer(ref_cfg, model=ref_model, data=ref_data, verbose=False)
    ref.fit()
    assert auto.step == ref.step
    for k, v in _flat_params(ref.engine.model).items():
        assert torch.equal(v, auto.engine.model.state_dict()[k]), k


def test_auto_microbatch_off_lets_oom_through(make_cfg) -> None:
    cfg = make_cfg("data.batch_size=64")
    data, model = _data_and_model(cfg)
    OOMAbove(model, 32)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        Trainer(cfg, model=model, data=data, verbose=False).fit()


def test_auto_microbatch_gives_up_at_one_example(make_cfg) -> None:
    cfg = make_cfg("data.batch_size=4", "train.auto_microbatch=true")
    data, model = _data_and_model(cfg)
    OOMAbove(model, 0)
    with pytest.raises(RuntimeError, match="even with a micro-batch of 1"):
        Trainer(cfg, model=model, data=data, verbose=False).fit()


# every technique at once, resumed: tests/train/test_resume.py


def test_model_init_key_applies_the_scheme(make_cfg) -> None:
    cfg = make_cfg("model.init=orthogonal", "model.kwargs.hidden=[64]")
    model = build.build_model_for(cfg, build.build_data_for(cfg).info)
    w = model.hidden[0].weight  # 64 x 64: orthogonal rows, scaled by the relu gain sqrt(2)
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(64), atol=1e-4, rtol=0)
    assert torch.equal(model.hidden[0].bias, torch.zeros(64))
    with pytest.raises(ValueError, match="zero_init_last"):
        build.build_model_for(make_cfg("model.zero_init_last=true"), build.build_data_for(cfg).info)


class SqrtNet(nn.Module):
    """Its backward produces NaN: d sqrt(x)/dx at x = 0 is inf, times 0 is NaN."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.flatten(x))
        return out + 0.0 * torch.sqrt(out * 0.0)


def test_detect_anomaly_names_the_backward_op(make_cfg) -> None:
    cfg = make_cfg("detect_anomaly=true", "train.nonfinite=ignore")
    data = build.build_data_for(cfg)
    trainer = Trainer(cfg, model=SqrtNet(64, 10), data=data, verbose=False)
    with (
        pytest.raises(RuntimeError, match="SqrtBackward0"),
        pytest.warns(UserWarning, match="Error detected in SqrtBackward0"),
    ):
        trainer.fit()
    assert not torch.is_anomaly_enabled()  # switched off again after the run

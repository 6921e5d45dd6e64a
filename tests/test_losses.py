"""Losses against reference formulas, PyTorch's own losses and hand-computed values."""

from __future__ import annotations

import importlib.util
import math
import re
import typing

import pytest
import torch
import torch.nn.functional as F
from runners import ROOT
from torch.testing import assert_close

from kiln.config import LossConfig
from kiln.losses import (
    LOSSES,
    MultiTaskLoss,
    build_loss,
    class_weights_from_counts,
    contrastive_loss,
    cosine_embedding_loss,
    focal_loss,
    soft_cross_entropy,
    triplet_loss,
    weighted_cross_entropy,
)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)


def _reference_ce(logits: torch.Tensor, soft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """-sum_c w_c t_c log q_c per sample."""
    return -(w * soft * F.log_softmax(logits, -1)).sum(-1)


# --- class weights and weighted cross-entropy ------------------------------------------------


def test_class_weights_from_counts_is_inverse_frequency_with_mean_one() -> None:
    w = class_weights_from_counts(torch.tensor([10, 30, 60]))
    inv = torch.tensor([1 / 10, 1 / 30, 1 / 60])
    assert_close(w, inv / inv.mean())
    assert_close(w.mean(), torch.tensor(1.0))
    assert_close(class_weights_from_counts([7, 7, 7]), torch.ones(3))


def test_class_weights_from_counts_refuses_an_empty_class() -> None:
    with pytest.raises(ValueError, match=r"classes \[1\] have no training examples"):
        class_weights_from_counts(torch.tensor([5, 0, 3]))


def test_weighted_ce_matches_formula_and_averages_over_samples(batch) -> None:
    logits, y = batch
    w = torch.tensor([0.5, 1.0, 2.0, 0.25, 3.0])  # the targets' weights sum to 11.5, not N = 8
    soft = F.one_hot(y, 5).float() * 0.9 + 0.1 / 5
    expected = _reference_ce(logits, soft, w)
    got = weighted_cross_entropy(logits, y, w, label_smoothing=0.1, reduction="none")
    assert_close(got, expected)
    mean = weighted_cross_entropy(logits, y, w, label_smoothing=0.1)
    assert_close(mean, expected.sum() / len(y))
    # PyTorch's weighted mean divides by the summed target weights instead: a different number.
    torch_mean = F.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    assert not torch.allclose(mean, torch_mean)


def test_weighted_ce_hard_and_soft_targets_agree(batch) -> None:
    logits, y = batch
    w = [0.5, 1.0, 2.0, 0.25, 1.25]
    hard = weighted_cross_entropy(logits, y, w, label_smoothing=0.2, reduction="none")
    onehot = weighted_cross_entropy(
        logits, F.one_hot(y, 5).float(), w, label_smoothing=0.2, reduction="none"
    )
    presmoothed = weighted_cross_entropy(
        logits, F.one_hot(y, 5).float() * 0.8 + 0.2 / 5, w, reduction="none"
    )
    assert_close(hard, onehot)
    assert_close(hard, presmoothed)


def test_weighted_ce_with_mixup_targets_matches_formula(batch) -> None:
    logits, y = batch
    w = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.25])
    lam, perm = 0.7, torch.arange(7, -1, -1)
    soft = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y[perm], 5).float()
    got = weighted_cross_entropy(logits, soft, w, reduction="sum")
    assert_close(got, _reference_ce(logits, soft, w).sum())


def test_weighted_ce_with_unit_weights_is_cross_entropy(batch) -> None:
    logits, y = batch
    ones = torch.ones(5)
    assert_close(
        weighted_cross_entropy(logits, y, ones, label_smoothing=0.1),
        F.cross_entropy(logits, y, label_smoothing=0.1),
    )
    soft = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), -1)
    assert_close(weighted_cross_entropy(logits, soft, ones), F.cross_entropy(logits, soft))


def test_weighted_ce_language_model_logits(batch) -> None:
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(2, 6, 5, generator=g), torch.randint(0, 5, (2, 6), generator=g)
    w = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.25])
    per_token = weighted_cross_entropy(logits, y, w, reduction="none")
    assert per_token.shape == (2, 6)
    flat = _reference_ce(logits.reshape(12, 5), F.one_hot(y.reshape(12), 5).float(), w)
    assert_close(per_token.reshape(12), flat)
    assert_close(weighted_cross_entropy(logits, y, w), flat.mean())


def test_weighted_ce_bf16_logits_give_float32() -> None:
    logits = torch.randn(4, 3).bfloat16()
    out = weighted_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), [1.0, 2.0, 3.0])
    assert out.dtype == torch.float32


# --- focal loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_ce_matches_formula_and_is_the_one_mixing_uses(batch, reduction) -> None:
    from kiln.algorithms import mixing

    logits, _ = batch
    soft = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), -1)
    per_row = -(soft * F.log_softmax(logits, -1)).sum(-1)
    expected = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    assert_close(soft_cross_entropy(logits, soft, reduction=reduction), expected)
    assert mixing.soft_cross_entropy is soft_cross_entropy  # one implementation, re-exported
    half = soft_cross_entropy(logits.bfloat16(), soft, reduction=reduction)
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.zeros(8, dtype=torch.long), r"soft cross-entropy: .*probabilities.*\[8, 5\]"),
        (torch.zeros(8, 3), r"soft_targets must be probabilities.*smooth_targets"),
    ],
)
def test_soft_ce_refuses_what_is_not_soft_targets(batch, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        soft_cross_entropy(batch[0], target)
    with pytest.raises(ValueError, match="soft cross-entropy: reduction must be one of"):
        soft_cross_entropy(batch[0], torch.full((8, 5), 0.2), "avg")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma_zero_and_no_alpha_is_cross_entropy(batch, reduction) -> None:
    logits, y = batch
    got = focal_loss(logits, y, gamma=0.0, reduction=reduction)
    expected = F.cross_entropy(logits, y, reduction=reduction)
    if reduction == "none":  # bit for bit per sample; the sums may differ in the last bit
        assert torch.equal(got, expected)
    assert_close(got, expected)


def test_focal_with_gamma_zero_is_weighted_ce_with_smoothing(batch) -> None:
    logits, y = batch
    alpha = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.25])
    got = focal_loss(logits, y, gamma=0.0, alpha=alpha, label_smoothing=0.1, reduction="sum")
    expected = F.cross_entropy(logits, y, weight=alpha, label_smoothing=0.1, reduction="sum")
    assert_close(got, expected)
    plain = focal_loss(logits, y, gamma=0.0, label_smoothing=0.1)
    assert_close(plain, F.cross_entropy(logits, y, label_smoothing=0.1))


def test_focal_hand_computed() -> None:
    # p = [0.7, 0.2, 0.1] for both rows; targets 0 and 2; alpha = [0.25, 1, 2], gamma = 2:
    # row 0: -0.25 * 0.3^2 * ln 0.7 = 0.00802518615...
    # row 1: -2.00 * 0.9^2 * ln 0.1 = 3.73018785...
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]], dtype=torch.float64))
    y = torch.tensor([0, 2])
    got = focal_loss(logits, y, gamma=2.0, alpha=[0.25, 1.0, 2.0], reduction="none")
    assert_close(got, torch.tensor([0.0080251862, 3.7301878536], dtype=torch.float64))
    mean = focal_loss(logits, y, gamma=2.0, alpha=[0.25, 1.0, 2.0])
    assert_close(mean, torch.tensor(1.8691065199, dtype=torch.float64))
    scalar = focal_loss(logits, y, gamma=2.0, alpha=0.5, reduction="sum")
    by_hand = 0.5 * (0.09 * -math.log(0.7) + 0.81 * -math.log(0.1))
    assert_close(scalar, torch.tensor(by_hand, dtype=torch.float64))


def test_focal_down_weights_easy_examples() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])  # row 0 easy, row 1 hard
    y = torch.tensor([0, 0])
    ratio = focal_loss(logits, y, reduction="none") / F.cross_entropy(logits, y, reduction="none")
    assert ratio[0] < 0.001 and ratio[1] > 0.2


def test_focal_gradient_is_finite_for_saturated_logits() -> None:
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    for gamma in (0.0, 0.5, 2.0):
        logits.grad = None
        focal_loss(logits, torch.tensor([0, 1]), gamma=gamma).backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


# --- error messages ----------------------------------------------------------------------------


def test_focal_refuses_one_hot_targets_with_a_hint() -> None:
    onehot = F.one_hot(torch.tensor([0, 1, 2, 1]), 10).float()
    expected = (
        "focal loss: targets must be class indices of shape [4], got float [4, 10]; "
        "pass label_smoothing instead of one-hot targets?"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        focal_loss(torch.randn(4, 10), onehot)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.zeros(4, 1, dtype=torch.long), r"got long \[4, 1\]; squeeze the last dimension"),
        (torch.zeros(4), r"got float \[4\]; convert class labels with targets.long\(\)"),
        (torch.zeros(3, dtype=torch.long), r"got long \[3\] for logits \[4, 5\]"),
    ],
)
def test_cross_entropy_names_what_it_expected(target, message) -> None:
    loss_fn = build_loss(LossConfig(), task="classification")
    with pytest.raises(ValueError, match="cross-entropy: targets must be class indices") as err:
        loss_fn(torch.randn(4, 5), target)
    assert re.search(message, str(err.value))


def test_weight_count_and_class_range_errors(batch) -> None:
    logits, y = batch
    with pytest.raises(ValueError, match="3 class weights for logits with 5 classes"):
        weighted_cross_entropy(logits, y, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 4\] for 5 classes"):
        focal_loss(logits, y + 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        focal_loss(logits, y, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_loss(logits, y, gamma=-1.0)


def test_a_target_check_passed_once_still_refuses_what_another_loss_refuses() -> None:
    # Checks are remembered by (dtype, shape, soft_ok, dims): soft targets accepted by a soft
    # cross-entropy must not let focal loss (no soft targets) or a new shape through.
    logits, soft = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), dim=1)
    cross_entropy = build_loss(LossConfig(), task="classification")
    for _ in range(2):
        soft_cross_entropy(logits, soft)
        with pytest.raises(ValueError, match="focal loss: targets must be class indices"):
            focal_loss(logits, soft)
        cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"got long \[3\] for logits \[4, 10\]"):
            cross_entropy(logits, torch.zeros(3, dtype=torch.long))


def test_classification_losses_refuse_integer_logits() -> None:
    with pytest.raises(ValueError, match=r"logits must be floating \[N, C\].*got long \[4\]"):
        weighted_cross_entropy(torch.arange(4), torch.arange(4))


# --- pair and triplet losses -------------------------------------------------------------------


def test_contrastive_hand_computed() -> None:
    x1 = torch.zeros(3, 2)
    x2 = torch.tensor([[3.0, 4.0]] * 3)  # d = 5 for every pair
    y = torch.tensor([1, 0, 0])
    got = contrastive_loss(x1, x2, y, margin=6.0, reduction="none")
    assert_close(got, torch.tensor([25.0, 1.0, 1.0]), rtol=1e-5, atol=1e-5)
    far = contrastive_loss(x1, x2, torch.tensor([0, 0, 0]), margin=2.0, reduction="sum")
    assert float(far) == 0.0


def test_contrastive_label_conventions_agree() -> None:
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y01 = torch.tensor([1, 0, 1, 0, 0, 1])
    ref = contrastive_loss(x1, x2, y01, margin=2.0)
    assert_close(contrastive_loss(x1, x2, y01 * 2 - 1, margin=2.0), ref)
    assert_close(contrastive_loss(x1, x2, y01.bool(), margin=2.0), ref)
    assert_close(contrastive_loss(x1, x2, y01.float(), margin=2.0), ref)
    d = (x1 - x2 + 1e-6).norm(dim=-1)
    manual = torch.where(y01 == 1, d**2, (2.0 - d).clamp(min=0) ** 2).mean()
    assert_close(ref, manual)


def test_contrastive_refuses_bad_labels_and_shapes() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"pair labels must be 1 \(similar\) or 0/-1.*\[0, 2\]"):
        contrastive_loss(x, x, torch.tensor([0, 2, 2, 0]))
    with pytest.raises(ValueError, match=r"targets must be pair labels of shape \[4\]"):
        contrastive_loss(x, x, torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"x1 and x2 must have the same shape, got \[4, 3\]"):
        contrastive_loss(x, torch.randn(4, 2), torch.ones(4))


@pytest.mark.parametrize("margin", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cosine_embedding_matches_torch(margin, reduction) -> None:
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    x2[:3] = x1[:3] + 0.1 * x2[:3]  # some pairs with a high cosine, above the margin
    y = torch.tensor([1, 1, -1, -1, 1, -1, 1, -1, -1, 1])
    expected = F.cosine_embedding_loss(x1, x2, y.float(), margin=margin, reduction=reduction)
    got = cosine_embedding_loss(x1, x2, y, margin=margin, reduction=reduction)
    assert_close(got, expected)
    assert_close(
        cosine_embedding_loss(x1, x2, (y + 1) // 2, margin=margin, reduction=reduction), got
    )


def test_cosine_embedding_hand_computed() -> None:
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos = 0 and 1/sqrt(2)
    got = cosine_embedding_loss(x1, x2, torch.tensor([1, 0]), margin=0.5, reduction="none")
    assert_close(got, torch.tensor([1.0, 2**-0.5 - 0.5]))


@pytest.mark.parametrize(("p", "swap"), [(2.0, False), (1.0, True)])
def test_triplet_matches_torch(p, swap) -> None:
    g = torch.Generator().manual_seed(5)
    a, pos, neg = (torch.randn(12, 4, generator=g) for _ in range(3))
    for reduction in ("mean", "sum", "none"):
        expected = F.triplet_margin_loss(
            a, pos, neg, margin=0.7, p=p, swap=swap, reduction=reduction
        )
        assert_close(
            triplet_loss(a, pos, neg, margin=0.7, p=p, swap=swap, reduction=reduction), expected
        )
    d_ap, d_an = (a - pos + 1e-6).norm(p=p, dim=-1), (a - neg + 1e-6).norm(p=p, dim=-1)
    if not swap:
        assert_close(
            triplet_loss(a, pos, neg, margin=0.7, p=p), (d_ap - d_an + 0.7).clamp(min=0).mean()
        )


def test_triplet_refuses_mismatched_embeddings() -> None:
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"anchor and negative must have the same shape"):
        triplet_loss(a, a, torch.randn(5, 3))
    with pytest.raises(
        ValueError, match=r"positive must be floating \[N, D\] embeddings, got long"
    ):
        triplet_loss(a, torch.zeros(4, 3, dtype=torch.long), a)


# --- multi-task --------------------------------------------------------------------------------


def test_multitask_learned_value_and_gradients_match_the_formula() -> None:
    mtl = MultiTaskLoss(3)
    with torch.no_grad():
        mtl.log_vars.copy_(torch.tensor([0.3, -0.5, 1.2]))  # type: ignore[union-attr]
    losses = torch.tensor([2.0, 0.4, 5.0], requires_grad=True)
    total = mtl(list(losses.unbind()))
    s = torch.tensor([0.3, -0.5, 1.2])
    assert_close(total, (torch.exp(-s) * losses.detach() + s).sum())
    total.backward()
    assert_close(mtl.log_vars.grad, 1 - torch.exp(-s) * losses.detach())  # type: ignore[union-attr]
    assert_close(losses.grad, torch.exp(-s))


def test_multitask_learned_log_variances_reach_log_of_the_losses() -> None:
    mtl = MultiTaskLoss(["a", "b"])
    log_vars = mtl.log_vars
    assert log_vars is not None
    fixed = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    for _ in range(60):  # gradient descent on s alone
        log_vars.grad = None
        mtl(fixed).backward()
        assert log_vars.grad is not None
        with torch.no_grad():
            log_vars.sub_(0.5 * log_vars.grad)
    assert_close(log_vars.detach(), torch.log(torch.tensor([4.0, 0.25])), atol=1e-3, rtol=0)
    assert_close(mtl.task_weights(), torch.tensor([0.25, 4.0]), atol=1e-3, rtol=0)


def test_multitask_fixed_weights_is_the_weighted_sum() -> None:
    mtl = MultiTaskLoss(["cls", "depth"], weights=[1.0, 0.1])
    assert list(mtl.parameters()) == []
    a = torch.tensor(2.0, requires_grad=True)
    total = mtl({"depth": torch.tensor(30.0), "cls": a})
    assert_close(total, torch.tensor(2.0 + 3.0))
    total.backward()
    assert_close(a.grad, torch.tensor(1.0))
    assert_close(mtl.task_weights(), torch.tensor([1.0, 0.1]))


def test_multitask_errors() -> None:
    mtl = MultiTaskLoss(["cls", "depth"])
    with pytest.raises(
        ValueError, match=r"task 'depth' loss must be a scalar tensor, got float \[8\]"
    ):
        mtl([torch.tensor(1.0), torch.ones(8)])
    with pytest.raises(ValueError, match=r"got losses for \['cls'\], expected \['cls', 'depth'\]"):
        mtl({"cls": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="1 weights for 2 tasks"):
        MultiTaskLoss(2, weights=[1.0])


# --- build_loss --------------------------------------------------------------------------------


def test_registry_covers_every_config_name() -> None:
    names = typing.get_args(LossConfig.model_fields["name"].annotation)
    assert set(LOSSES) == set(names) - {"auto"}


def test_existing_names_are_unchanged(batch) -> None:
    logits, y = batch
    ce = build_loss(LossConfig(label_smoothing=0.1), task="classification")
    assert_close(ce(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1), rtol=0, atol=0)
    soft = torch.softmax(logits.flip(0), -1)
    assert_close(
        ce(logits, soft, reduction="sum"),
        F.cross_entropy(logits, soft, reduction="sum", label_smoothing=0.1),
    )
    lm = build_loss(LossConfig(), task="lm")
    tokens, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    assert_close(lm(tokens, targets), F.cross_entropy(tokens.reshape(6, 5), targets.reshape(6)))
    mse = build_loss(LossConfig(), task="regression")
    assert_close(mse(torch.ones(4, 1), torch.zeros(4)), torch.tensor(1.0))
    l1 = build_loss(LossConfig(name="l1"), task="regression")
    assert_close(l1(torch.full((4,), 3.0), torch.zeros(4), reduction="sum"), torch.tensor(12.0))


def test_build_weighted_ce_from_class_counts(batch) -> None:
    logits, y = batch
    counts = torch.tensor([10, 20, 40, 5, 25])
    cfg = LossConfig(name="weighted_cross_entropy", class_weights="auto", label_smoothing=0.1)
    loss_fn = build_loss(cfg, task="classification", class_counts=counts)
    w = class_weights_from_counts(counts)
    expected = weighted_cross_entropy(logits, y, w, label_smoothing=0.1, reduction="sum")
    assert_close(loss_fn(logits, y, reduction="sum"), expected)
    listed = build_loss(cfg.model_copy(update={"class_weights": w.tolist()}), task="classification")
    assert_close(listed(logits, y), expected / len(y))


def test_build_focal_uses_class_weights_as_alpha(batch) -> None:
    logits, y = batch
    cfg = LossConfig(name="focal", gamma=1.5, class_weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    got = build_loss(cfg, task="classification")(logits, y)
    assert_close(got, focal_loss(logits, y, gamma=1.5, alpha=[1.0, 2.0, 3.0, 4.0, 5.0]))
    no_alpha = build_loss(LossConfig(name="focal", gamma=0.0), task="classification")
    assert_close(no_alpha(logits, y), F.cross_entropy(logits, y))


def test_build_loss_errors_say_how_to_fix() -> None:
    auto = LossConfig(name="focal", class_weights="auto")
    with pytest.raises(ValueError, match=r"class_weights=auto needs the training split's class"):
        build_loss(auto, task="classification")
    with pytest.raises(ValueError, match=r"weighted_cross_entropy needs loss\.class_weights"):
        build_loss(LossConfig(name="weighted_cross_entropy"), task="classification")
    with pytest.raises(ValueError, match="has 2 entries but the data has 3 classes"):
        build_loss(
            LossConfig(name="weighted_cross_entropy", class_weights=[1.0, 2.0]),
            task="classification",
            class_counts=torch.tensor([1, 2, 3]),
        )
    with pytest.raises(ValueError, match=r"loss\.name=cross_entropy does not use it"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), task="classification")
    with pytest.raises(ValueError, match=r"loss\.name=focal needs class targets"):
        build_loss(LossConfig(name="focal"), task="regression")
    with pytest.raises(ValueError, match="mse is a regression loss but the task is lm"):
        build_loss(LossConfig(name="mse"), task="lm")


# --- the example -------------------------------------------------------------------------------


def test_siamese_example_learns_from_few_steps() -> None:
    spec = importlib.util.spec_from_file_location(
        "siamese_pairs", ROOT / "examples/siamese_pairs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(steps=60)
    # Untrained: pair accuracy ~0.52 (chance), 1-NN ~0.93 (pixels alone are good neighbours);
    # after 60 steps ~0.93 and ~0.97.
    assert result["pair_accuracy"] > 0.85 and result["knn_accuracy"] > 0.9

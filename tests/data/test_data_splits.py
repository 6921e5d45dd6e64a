"""Splits: sizes, disjointness, seeding, stratification, fallback; train-only standardisation."""

from __future__ import annotations

import pytest
import torch

from kiln.data.base import ArrayDataset
from kiln.data.gather import is_batched
from kiln.data.splits import split_indices, split_sizes, standardize, subset_splits


@pytest.mark.parametrize(("n", "val", "test"), [(100, 0.1, 0.2), (7, 0.3, 0.3), (50, 0.0, 0.2)])
def test_split_is_a_sorted_disjoint_cover(n: int, val: float, test: float) -> None:
    tr, va, te = split_indices(n, val_fraction=val, test_fraction=test, seed=3)
    assert sorted(tr + va + te) == list(range(n))
    assert (len(tr), len(va), len(te)) == split_sizes(n, val_fraction=val, test_fraction=test)
    for part in (tr, va, te):
        assert part == sorted(part)
        assert all(isinstance(i, int) for i in part)


def test_split_sizes_round_and_keep_one_per_requested_split() -> None:
    assert split_sizes(1797, val_fraction=0.1, test_fraction=0.2) == (1258, 180, 359)
    assert split_sizes(3, val_fraction=0.1, test_fraction=0.1) == (1, 1, 1)
    assert split_sizes(10, val_fraction=0.0, test_fraction=0.0) == (10, 0, 0)


def test_too_few_examples_says_how_many_are_needed() -> None:
    with pytest.raises(ValueError, match=r"2 rows cannot fill .* need at least 3"):
        split_sizes(2, val_fraction=0.1, test_fraction=0.1, what="rows")


def test_same_seed_same_split_other_seed_other_split() -> None:
    a = split_indices(200, val_fraction=0.1, test_fraction=0.2, seed=0)
    b = split_indices(200, val_fraction=0.1, test_fraction=0.2, seed=0)
    c = split_indices(200, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert a == b
    assert a[1] != c[1] and a[2] != c[2]


def test_stratified_split_keeps_class_proportions() -> None:
    labels = [0] * 120 + [1] * 60 + [2] * 20
    tr, va, te = split_indices(200, val_fraction=0.1, test_fraction=0.2, seed=5, stratify=labels)
    assert sorted(tr + va + te) == list(range(200))
    for cls, count in ((0, 120), (1, 60), (2, 20)):
        in_val = sum(labels[i] == cls for i in va)
        in_test = sum(labels[i] == cls for i in te)
        assert abs(in_val - count * len(va) / 200) <= 1
        assert abs(in_test - count * len(te) / 200) <= 2


def test_rare_class_falls_back_without_dropping_examples() -> None:
    labels = [0] * 20 + [1]  # one member: stratification is impossible
    tr, va, te = split_indices(21, val_fraction=0.2, test_fraction=0.2, seed=0, stratify=labels)
    assert sorted(tr + va + te) == list(range(21))
    assert (len(tr), len(va), len(te)) == (13, 4, 4)


def test_stratify_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 labels for 4 examples"):
        split_indices(4, val_fraction=0.0, test_fraction=0.0, seed=0, stratify=[0, 1, 0])


def test_subset_splits_keep_batched_gather_and_none_for_empty() -> None:
    ds = ArrayDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    train, val, test = subset_splits(ds, [0, 2, 4, 6], [1, 3], [])
    assert test is None and val is not None
    assert is_batched(train)
    xb, yb = train.__getitems__([1, 3])  # positions inside the subset -> rows 2 and 6
    assert yb.tolist() == [2, 6]
    assert xb.flatten().tolist() == [2.0, 6.0]
    assert val[1][1].item() == 3


def test_standardize_uses_train_rows_only() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=gen) * 5 + 2
    train = list(range(12))
    z, mean, std = standardize(x, train)
    ref = x[:12].double()
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean(0))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std(0, correction=0))
    torch.testing.assert_close(z[:12].double().mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(z[:12].double().std(0, correction=0), torch.ones(3).double())
    # Changing a held-out row changes nothing about the train rows' transformed values.
    x2 = x.clone()
    x2[15] = 1000.0
    z2, mean2, _ = standardize(x2, train)
    assert mean2 == mean
    torch.testing.assert_close(z2[:12], z[:12], rtol=0, atol=0)


def test_standardize_scalar_and_constant_column() -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    z, mean, std = standardize(x, [0, 1])
    assert std == [1.0, 1.0] and mean == [2.0, 5.0]
    assert not torch.isnan(z).any()
    assert z[:, 1].tolist() == [0.0, 0.0]
    _, mean_all, std_all = standardize(x, [0, 1], per_feature=False)
    assert mean_all == [3.5]
    assert std_all == pytest.approx([torch.tensor([1.0, 5, 3, 5]).std(correction=0).item()])

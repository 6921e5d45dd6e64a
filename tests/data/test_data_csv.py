"""CSV tables: parsing, task detection, string labels, train-only standardisation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.config import DataConfig
from kiln.data import build_data, is_batched


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _numeric_rows(n: int = 30) -> list[list[object]]:
    # age, income, label (3 classes, integer-valued) and price (continuous).
    return [[20 + i, 1000.0 + 37.5 * i, i % 3, round(0.5 + i * 1.37, 2)] for i in range(n)]


def _cfg(path: Path, target: str, **kw: object) -> DataConfig:
    return DataConfig(name="csv", path=str(path), target=target, **kw)  # type: ignore[arg-type]


def test_integer_target_is_classification(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], _numeric_rows())
    bundle = build_data(_cfg(path, "label"), seed=0)
    info = bundle.info
    assert info.task == "classification" and info.num_classes == 3
    assert info.class_names == ["0", "1", "2"]
    assert info.input_shape == (3,)
    assert info.extra["feature_names"] == ["age", "income", "price"]
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert is_batched(bundle.train)
    assert bundle.val is not None and bundle.test is not None
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 30
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert base.y.tolist() == [i % 3 for i in range(30)]
    json.dumps(info.extra)


def test_continuous_target_is_regression(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], _numeric_rows())
    bundle = build_data(_cfg(path, "price"), seed=0)
    assert bundle.info.task == "regression" and bundle.info.num_outputs == 1
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert base.y.shape == (30, 1) and base.y.dtype == torch.float32
    assert base.y[3, 0].item() == pytest.approx(0.5 + 3 * 1.37)


def test_string_labels_become_sorted_classes(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]
    rows: list[list[object]] = [[i, i * 2.0, names[i % 3]] for i in range(24)]
    path = _write(tmp_path / "animals.csv", ["a", "b", "kind"], rows)
    bundle = build_data(_cfg(path, "kind"), seed=0)
    assert bundle.info.task == "classification"
    assert bundle.info.class_names == ["bird", "cat", "dog"]
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert base.y[:3].tolist() == [2, 1, 0]  # dog, cat, bird


def test_standardisation_ignores_val_and_test_rows(tmp_path: Path) -> None:
    rows = _numeric_rows()
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], rows)
    first = build_data(_cfg(path, "price"), seed=0)
    train_idx = first.train.indices  # type: ignore[attr-defined]
    assert first.test is not None
    test_row = first.test.indices[0]  # type: ignore[attr-defined]
    base = first.train.dataset  # type: ignore[attr-defined]
    xt = base.x[train_idx].double()
    torch.testing.assert_close(xt.mean(0), torch.zeros(3).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(xt.std(0, correction=0), torch.ones(3).double(), atol=1e-5, rtol=0)

    rows[test_row][0] = 10_000  # a wild value in a held-out row
    _write(path, ["age", "income", "label", "price"], rows)
    second = build_data(_cfg(path, "price"), seed=0)
    base2 = second.train.dataset  # type: ignore[attr-defined]
    assert second.train.indices == train_idx  # type: ignore[attr-defined]
    torch.testing.assert_close(base2.x[train_idx], base.x[train_idx], rtol=0, atol=0)
    assert second.info.extra["mean"] == first.info.extra["mean"]
    assert base2.x[test_row, 0] != base.x[test_row, 0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"CSV file not found: .*nope\.csv.*fix data.path"):
        build_data(_cfg(tmp_path / "nope.csv", "y"), seed=0)


def test_missing_target_lists_columns_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], _numeric_rows())
    with pytest.raises(ValueError, match=r"target column 'lable' is not in \S*t\.csv") as exc:
        build_data(_cfg(path, "lable"), seed=0)
    assert "columns: age, income, label, price" in str(exc.value)
    assert "did you mean 'label'?" in str(exc.value)


@pytest.mark.parametrize(("cell", "why"), [("", "is empty/NaN"), ("NaN", "is empty/NaN")])
def test_empty_or_nan_feature_cell(tmp_path: Path, cell: str, why: str) -> None:
    rows = _numeric_rows()
    rows[6][0] = cell
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], rows)
    with pytest.raises(
        ValueError, match=rf"row 7 \(line 8 of \S*t\.csv\), column 'age' {why}; fill"
    ):
        build_data(_cfg(path, "label"), seed=0)


def test_non_numeric_feature_cell(tmp_path: Path) -> None:
    rows = _numeric_rows()
    rows[2][1] = "lots"
    path = _write(tmp_path / "t.csv", ["age", "income", "label", "price"], rows)
    with pytest.raises(
        ValueError, match=r"row 3 .*column 'income' has the non-numeric value 'lots'"
    ):
        build_data(_cfg(path, "label"), seed=0)


def test_missing_target_value(tmp_path: Path) -> None:
    rows: list[list[object]] = [[i, "" if i == 9 else i % 2] for i in range(20)]
    path = _write(tmp_path / "t.csv", ["a", "y"], rows)
    with pytest.raises(ValueError, match=r"row 10 .*target column 'y' is empty/NaN/infinite"):
        build_data(_cfg(path, "y"), seed=0)


def test_non_numeric_regression_target(tmp_path: Path) -> None:
    rows: list[list[object]] = [[i, "x" if i == 4 else i * 0.5] for i in range(20)]
    path = _write(tmp_path / "t.csv", ["a", "y"], rows)
    with pytest.raises(ValueError, match=r"row 5 .*'y' has the non-numeric value 'x'; regression"):
        build_data(_cfg(path, "y", task="regression"), seed=0)


def test_too_few_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ["a", "y"], [[1, 0], [2, 1]])
    with pytest.raises(
        ValueError, match=r"2 data rows in \S*t\.csv cannot fill .* need at least 3"
    ):
        build_data(_cfg(path, "y"), seed=0)


def test_header_required(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ["1", "2.5", "0"], [[2, 3.5, 1]] * 10)
    with pytest.raises(ValueError, match=r"looks like data .* add a header row"):
        build_data(_cfg(path, "0"), seed=0)


def test_ragged_row(tmp_path: Path) -> None:
    rows: list[list[object]] = [[i, i % 2] for i in range(10)]
    rows[3] = [3, 1, 9]
    path = _write(tmp_path / "t.csv", ["a", "y"], rows)
    with pytest.raises(ValueError, match=r"row 4 \(line 5 of \S*t\.csv\) has 3 cells .* 2 columns"):
        build_data(_cfg(path, "y"), seed=0)

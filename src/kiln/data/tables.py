"""Tabular data: scikit-learn's bundled tables (``sklearn:<name>``) and a user's CSV file.

Why one module: both end the same way (a float feature matrix plus class labels or regression
targets), so :func:`tabular_bundle` does the shared part once: a seeded split, stratified for
classification, and feature standardisation with train-split statistics only. CSV parsing uses
the standard library (no pandas dependency) and every bad cell is reported with its row, column
and the fix.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_sklearn_table("wine", DataConfig(name="sklearn:wine"), seed=0)
    >>> bundle.info.task, bundle.info.input_shape, bundle.info.num_classes
    ('classification', (13,), 3)
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import DataConfig, did_you_mean
from kiln.data.base import ArrayDataset, DataBundle, DataInfo, Task
from kiln.data.files import read_utf8, require_file
from kiln.data.splits import split_indices, split_sizes, standardize, subset_splits
from kiln.errors import DataError

__all__ = ["build_csv", "build_sklearn_table", "sklearn_tables", "tabular_bundle"]

# load_* functions of sklearn.datasets that do not return one bundled (data, target) table.
_NOT_TABLES = {"files", "sample_image", "sample_images", "svmlight_file", "svmlight_files"}
_MISSING = {"", "na", "n/a", "nan", "null", "none"}
_MAX_AUTO_CLASSES = 20


def tabular_bundle(
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    class_names: list[str] | None,
    feature_names: list[str],
    cfg: DataConfig,
    seed: int,
    source: str,
) -> DataBundle:
    """Split a feature matrix and its targets, standardise on train rows, wrap as a bundle.

    Args:
        x: ``(N, F)`` numeric features.
        y: classification: ``(N,)`` class indices ``0..K-1``; regression: ``(N,)`` or ``(N, K)``.
        task: ``classification`` or ``regression``.
        class_names: names of classes ``0..K-1`` (classification).
        feature_names: one name per column of ``x``.
        cfg: uses ``val_fraction``, ``test_fraction`` and ``standardize``.
        seed: seeds the split.
        source: recorded in ``info.extra["source"]``.

    Returns:
        Train/val/test subsets of one :class:`ArrayDataset` (float32 features; int64 labels or
        float32 ``(N, K)`` targets) and the :class:`DataInfo`; regression targets are kept raw,
        their train mean/std go to ``info.extra["target_mean"/"target_std"]``.
    """
    features = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if task == "classification":
        targets = torch.as_tensor(np.asarray(y), dtype=torch.int64).reshape(-1)
        num_classes = len(class_names) if class_names else int(targets.max()) + 1
        stratify: torch.Tensor | None = targets
    else:
        targets = torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(len(features), -1)
        num_classes, stratify = 0, None
    train_idx, val_idx, test_idx = split_indices(
        len(features),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        stratify=stratify,
    )
    extra: dict[str, Any] = {
        "source": source,
        "feature_names": list(feature_names),
        "splits": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
    }
    if cfg.standardize:
        features, extra["mean"], extra["std"] = standardize(features, train_idx)
    features = features.to(torch.float32)
    if task == "regression":
        _, extra["target_mean"], extra["target_std"] = standardize(targets, train_idx)
        targets = targets.to(torch.float32)

    train, val, test = subset_splits(ArrayDataset(features, targets), train_idx, val_idx, test_idx)
    info = DataInfo(
        task=task,
        input_shape=(features.shape[1],),
        num_classes=num_classes if task == "classification" else None,
        num_outputs=1 if task == "classification" else targets.shape[1],
        class_names=class_names if task == "classification" else None,
        extra=extra,
    )
    return DataBundle(train=train, val=val, test=test, info=info)


def _encode_classes(values: np.ndarray, names: list[str] | None = None) -> tuple[Any, list[str]]:
    """Map label values to indices ``0..K-1`` in sorted order; returns ``(codes, class names)``."""
    classes, codes = np.unique(values, return_inverse=True)
    if names is None or len(names) < len(classes):
        # Integer-valued float labels read from a CSV ("3" or "3.0") are named "3".
        names = [str(int(c)) if isinstance(c, float | np.floating) else str(c) for c in classes]
    elif np.issubdtype(classes.dtype, np.integer):
        names = [str(names[int(c)]) for c in classes]  # target_names are indexed by label value
    return codes.astype(np.int64), names


# --------------------------------------------------------------------------- scikit-learn


def sklearn_tables() -> list[str]:
    """Names usable as ``data.name=sklearn:<name>`` (the tables that ship with scikit-learn).

    Example:
        >>> "wine" in sklearn_tables()
        True
    """
    import sklearn.datasets as skd

    names = (n.removeprefix("load_") for n in dir(skd) if n.startswith("load_"))
    return sorted(n for n in names if n not in _NOT_TABLES)


def build_sklearn_table(name: str, cfg: DataConfig, *, seed: int) -> DataBundle:
    """Load ``sklearn.datasets.load_<name>()`` as a standardised, split table.

    The task is classification when the loader returns integer targets with ``target_names``
    (iris, wine, breast_cancer, digits), else regression (diabetes, linnerud); ``cfg.task``
    overrides it when not ``auto``.

    Raises:
        DataError: an unknown name (with the available ones), or classification asked for
            continuous targets.
    """
    import sklearn.datasets as skd

    available = sklearn_tables()
    if name not in available:
        raise DataError(
            f"unknown scikit-learn dataset {name!r} (data.name=sklearn:{name}); "
            f"{did_you_mean(name, available)}available: {', '.join(available)}"
        )
    raw = getattr(skd, f"load_{name}")()
    x = np.asarray(raw.data, dtype=np.float64)
    y = np.asarray(raw.target)
    target_names = raw.get("target_names")
    natural: Task = "regression"
    if np.issubdtype(y.dtype, np.integer) and target_names is not None:
        natural = "classification"
    task: Task = natural if cfg.task == "auto" else cfg.task
    names = [str(f) for f in raw.get("feature_names", [])] or [f"x{i}" for i in range(x.shape[1])]
    class_names = None
    if task == "classification":
        if y.ndim != 1 or not np.all(np.mod(y, 1) == 0):
            kind = f"{y.shape[1]} target columns" if y.ndim != 1 else "non-integer targets"
            raise DataError(
                f"sklearn:{name} has {kind}, so data.task=classification does not apply; set "
                "data.task=auto or regression"
            )
        known = [str(t) for t in target_names] if natural == "classification" else None
        y, class_names = _encode_classes(y, known)
    return tabular_bundle(
        x,
        y,
        task=task,
        class_names=class_names,
        feature_names=names,
        cfg=cfg,
        seed=seed,
        source=f"sklearn:{name}",
    )


# --------------------------------------------------------------------------- CSV


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and each row's line number; checks the encoding and shape of the file."""
    text = read_utf8(path, "CSV file")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[list[str]] = []
    lines: list[int] = []
    header: list[str] | None = None
    done = 0  # lines read by the last complete record: a failing record starts after it
    try:
        for row in reader:
            done = reader.line_num
            if not row:
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                continue
            if len(row) != len(header):
                raise DataError(
                    f"row {len(rows) + 1} (line {reader.line_num} of {path}) has {len(row)} "
                    f"cells but the header has {len(header)} columns; fix that line (quote "
                    "cells that contain commas)"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        # e.g. a cell over csv's field size limit: usually a quote that is never closed.
        raise DataError(
            f"line {done + 1} of {path} cannot be read as CSV ({exc}); check the "
            "quotes on that line (a quote opened and never closed swallows the rest of the file)"
        ) from None
    if header is None:
        raise DataError(f"CSV file {path} is empty; a CSV needs a header row naming its columns")
    if all(_is_number(h) for h in header):
        raise DataError(
            f"the first row of {path} looks like data ({', '.join(header[:4])}), not a header; "
            "add a header row naming the columns"
        )
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        raise DataError(f"{path}: header column {empty[0]} has no name; name every column")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column names {dupes}; make each header unique")
    if not rows:
        raise DataError(f"CSV file {path} has a header but no data rows; add rows below it")
    return header, rows, lines


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bad_cell(path: Path, rows: list[list[str]], lines: list[int], col: int, name: str) -> str:
    """The message for the first empty, NaN or non-numeric cell of column ``col``."""
    for r, row in enumerate(rows):
        cell = row[col].strip()
        where = f"row {r + 1} (line {lines[r]} of {path}), column {name!r}"
        if cell.lower() in _MISSING:
            return f"{where} is empty/NaN; fill or drop it"
        if not _is_number(cell):
            return (
                f"{where} has the non-numeric value {cell!r}; features must be numbers: "
                "encode it (e.g. one-hot) or drop the column"
            )
        if not math.isfinite(float(cell)):
            return f"{where} is infinite ({cell!r}); replace or drop it"
    raise AssertionError("no bad cell found")  # pragma: no cover - callers checked first


def _features(
    path: Path, header: list[str], rows: list[list[str]], lines: list[int], cols: list[int]
) -> np.ndarray:
    """The ``(N, F)`` float64 feature matrix; a bad cell raises with its row and column."""
    cells = np.array([[row[c].strip() for c in cols] for row in rows], dtype=str)
    try:
        x = cells.astype(np.float64)  # fast path; "nan" parses, so finiteness is checked too
        if np.isfinite(x).all():
            return x
    except ValueError:
        pass
    for j, c in enumerate(cols):
        column = cells[:, j]
        if any(v.lower() in _MISSING or not _is_number(v) for v in column) or not all(
            math.isfinite(float(v)) for v in column
        ):
            raise DataError(_bad_cell(path, rows, lines, c, header[c]))
    return np.array([[float(v) for v in row] for row in cells], dtype=np.float64)


def build_csv(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Load a CSV file with a header row; ``cfg.target`` names the label/target column.

    Every other column is a numeric feature. The task (when ``cfg.task`` is ``auto``) is
    classification if the target is non-numeric, or integer-valued with at most 20 distinct
    values; otherwise regression. String labels become class indices in sorted order.

    Raises:
        DataError: missing or non-UTF-8 file, a ragged row, no header or no rows, missing
            target column (with the columns), an empty/NaN or non-numeric feature cell (with
            row and column), a single class, or too few rows for the splits.
    """
    path = require_file(cfg.path or "", "CSV file")
    header, rows, lines = _read_rows(path)
    target = cfg.target or ""
    if target not in header:
        raise DataError(
            f"target column {target!r} is not in {path}; {did_you_mean(target, header)}"
            f"columns: {', '.join(header)} (set data.target)"
        )
    split_sizes(
        len(rows),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        what=f"data rows in {path}",
    )
    t = header.index(target)
    cols = [i for i in range(len(header)) if i != t]
    if not cols:
        raise DataError(f"{path} has only the target column {target!r}; add feature columns")

    x = _features(path, header, rows, lines, cols)

    raw_y = [row[t].strip() for row in rows]
    for r, v in enumerate(raw_y):
        if v.lower() in _MISSING or (_is_number(v) and not math.isfinite(float(v))):
            raise DataError(
                f"row {r + 1} (line {lines[r]} of {path}), target column {target!r} is "
                f"empty/NaN/infinite ({v!r}); fill or drop that row"
            )
    numeric = all(_is_number(v) for v in raw_y)
    task: Task
    if cfg.task != "auto":
        task = cfg.task
    elif not numeric:
        task = "classification"
    else:
        values = np.array([float(v) for v in raw_y])
        integral = bool(np.all(np.mod(values, 1) == 0))
        few = len(np.unique(values)) <= _MAX_AUTO_CLASSES
        task = "classification" if integral and few else "regression"

    class_names = None
    if task == "classification":
        labels: np.ndarray = np.array([float(v) for v in raw_y]) if numeric else np.array(raw_y)
        if numeric and not np.all(np.mod(labels, 1) == 0):
            raise DataError(
                f"target column {target!r} of {path} holds non-integer numbers, so "
                "data.task=classification does not apply; set data.task=regression or auto"
            )
        y, class_names = _encode_classes(labels)
        if len(class_names) < 2:
            raise DataError(
                f"target column {target!r} of {path} holds one class ({class_names[0]!r}); "
                "classification needs at least two (check data.target)"
            )
    else:
        bad = next((r for r, v in enumerate(raw_y) if not _is_number(v)), None)
        if bad is not None:
            raise DataError(
                f"row {bad + 1} (line {lines[bad]} of {path}), target column {target!r} "
                f"has the non-numeric value {raw_y[bad]!r}; regression needs numbers (use "
                "data.task=classification for labels)"
            )
        y = np.array([float(v) for v in raw_y])
    return tabular_bundle(
        x,
        y,
        task=task,
        class_names=class_names,
        feature_names=[header[c] for c in cols],
        cfg=cfg,
        seed=seed,
        source=f"csv:{path}",
    )

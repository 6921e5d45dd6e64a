"""Data sources: one call turns a :class:`~kiln.config.DataConfig` into split datasets.

Every source returns a :class:`DataBundle` (train/val/test datasets plus a :class:`DataInfo`
that models and losses are built from). The rules every source keeps: seeded splits, stratified
for classification; normalisation statistics from the train split only; in-memory data in an
:class:`ArrayDataset` so whole batches are gathered with one index op.

Importing this package is light: scikit-learn and Pillow are imported inside the functions
that use them.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_data(DataConfig(name="sklearn:iris"), seed=0)
    >>> bundle.info.task, bundle.info.input_shape, len(bundle.train)
    ('classification', (4,), 105)
"""

from __future__ import annotations

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.digits import build_digits
from kiln.data.gather import is_batched
from kiln.data.images import build_image_folder
from kiln.data.loader import make_loader
from kiln.data.multitask import build_digits_multitask
from kiln.data.splits import split_indices, split_sizes, standardize, subset_splits
from kiln.data.subsets import few_shot, select_classes
from kiln.data.synthetic import build_synthetic
from kiln.data.tables import build_csv, build_sklearn_table, sklearn_tables
from kiln.data.text import build_text, decode, encode
from kiln.errors import DataError

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "DataInfo",
    "build_data",
    "decode",
    "encode",
    "is_batched",
    "make_loader",
    "sklearn_tables",
    "split_indices",
    "split_sizes",
    "standardize",
    "subset_splits",
]

# The layouts each source can produce; the first is the one it gives when asked for another.
_LAYOUTS = {
    "digits": ("flat", "image"),
    "digits_multitask": ("flat", "image"),
    "images": ("image",),
}


def _layout(cfg: DataConfig, requested: str) -> str:
    """The layout to build: ``cfg.layout`` when set, else ``requested`` if the source has it."""
    if requested not in ("flat", "image"):
        raise DataError(f"layout must be 'flat' or 'image', got {requested!r}")
    source = cfg.name if cfg.name in _LAYOUTS else "table"
    supported = _LAYOUTS.get(source, ("flat",))
    if cfg.layout != "auto":
        if cfg.layout not in supported:
            raise DataError(
                f"data.layout={cfg.layout} is not available for data.name={cfg.name} (it gives "
                f"{' or '.join(supported)} data); set data.layout=auto"
            )
        return cfg.layout
    # The caller's layout is a preference (from the model family): only digits has a choice.
    return requested if requested in supported else supported[0]


def build_data(
    cfg: DataConfig, *, seed: int, layout: str = "flat", sample_seed: int | None = None
) -> DataBundle:
    """Build the source's splits, then keep ``cfg.classes`` and ``cfg.train_per_class``.

    ``seed`` seeds the split; ``sample_seed`` (default ``seed``; the trainer passes the run's
    seed) picks the ``train_per_class`` labelled examples. See :func:`_build_source` for the
    sources and :mod:`kiln.data.subsets` for the subsets.
    """
    bundle = _build_source(cfg, seed=seed, layout=layout)
    if cfg.classes is not None:
        bundle = select_classes(bundle, cfg.classes)
    if cfg.train_per_class is not None and cfg.name != "topics":  # topics limits it itself
        bundle = few_shot(bundle, cfg.train_per_class, seed if sample_seed is None else sample_seed)
    return bundle


def _build_source(cfg: DataConfig, *, seed: int, layout: str = "flat") -> DataBundle:
    """Build the train/val/test datasets described by ``cfg``.

    Args:
        cfg: ``cfg.name`` picks the source: ``digits``, ``digits_multitask``,
            ``sklearn:<name>`` (see :func:`sklearn_tables`), ``csv``, ``images``, ``synthetic``
            or ``text``.
        seed: seeds the split (and the generator for ``synthetic``).
        layout: ``flat`` or ``image``, the caller's choice when ``cfg.layout`` is ``auto``
            (``cfg.layout`` wins otherwise). Only digits can give both; the other sources give
            their one natural layout, and an explicit ``cfg.layout`` they cannot give is an error.

    Returns:
        A :class:`DataBundle`; ``bundle.info`` says the task, input shape and classes.

    Raises:
        DataError: an unknown source or any problem with the data, naming the fix.

    Example:
        >>> info = build_data(DataConfig(), seed=0, layout="image").info
        >>> info.input_shape, info.class_names[:3]
        ((1, 32, 32), ['0', '1', '2'])
    """
    chosen = _layout(cfg, layout)
    name = cfg.name
    if name == "digits":
        return build_digits(cfg, seed=seed, layout=chosen)
    if name == "digits_multitask":
        return build_digits_multitask(cfg, seed=seed, layout=chosen)
    if name.startswith("sklearn:"):
        return build_sklearn_table(name.removeprefix("sklearn:"), cfg, seed=seed)
    if name == "csv":
        return build_csv(cfg, seed=seed)
    if name == "images":
        return build_image_folder(cfg, seed=seed)
    if name == "synthetic":
        return build_synthetic(cfg, seed=seed)
    if name == "text":
        return build_text(cfg, seed=seed)
    if name == "topics":
        from kiln.data.topics import build_topics  # tokenizers is imported only here

        return build_topics(cfg, seed=seed)
    raise DataError(
        f"unknown data source {name!r}; allowed: digits, digits_multitask, sklearn:<name>, "
        "csv, images, synthetic, text, topics"
    )

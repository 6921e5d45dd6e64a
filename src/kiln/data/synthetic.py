"""Generated data (``data.name=synthetic``) from scikit-learn's ``make_classification`` and
``make_regression``, seeded from the job's seed.

Why: a dataset of any size and width, made in milliseconds and identical for a given seed, is
what benchmarks, smoke tests and "does my model learn at all?" checks need. The generated table
goes through the same split and train-only standardisation as every other table.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_synthetic(DataConfig(name="synthetic"), seed=0)
    >>> bundle.info.input_shape, bundle.info.num_classes
    ((20,), 2)
"""

from __future__ import annotations

from kiln.config import DataConfig
from kiln.data.base import DataBundle, Task
from kiln.data.tables import tabular_bundle
from kiln.errors import DataError

__all__ = ["build_synthetic"]


def build_synthetic(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Generate, split and standardise a synthetic table described by ``cfg.synthetic``.

    ``cfg.synthetic.noise`` means what it means to each generator: for classification, the
    fraction of labels assigned at random (``flip_y``); for regression, the std of the Gaussian
    noise added to the targets. Two features (or fewer, when there is no room) are redundant
    linear combinations of the informative ones in classification. ``cfg.task``, when not
    ``auto``, overrides ``cfg.synthetic.task``.

    Args:
        cfg: data settings; ``cfg.synthetic`` holds the generator's settings.
        seed: ``random_state`` of the generator, and the split's seed.

    Returns:
        Classification: int64 labels, ``n_classes`` classes named "0".."K-1"; regression:
        float32 targets of shape ``(N, 1)``.

    Raises:
        DataError: ``n_informative > n_features``, too many classes for the informative
            features, or a classification ``noise`` above 1.
    """
    from sklearn.datasets import make_classification, make_regression

    s = cfg.synthetic
    task: Task = s.task if cfg.task == "auto" else cfg.task
    if s.n_informative > s.n_features:
        raise DataError(
            f"data.synthetic.n_informative={s.n_informative} exceeds n_features={s.n_features}; "
            "lower n_informative or raise n_features"
        )
    names = [f"x{i}" for i in range(s.n_features)]
    if task == "regression":
        x, y = make_regression(
            n_samples=s.n_samples,
            n_features=s.n_features,
            n_informative=s.n_informative,
            noise=s.noise,
            random_state=seed,
        )
        return tabular_bundle(
            x,
            y,
            task="regression",
            class_names=None,
            feature_names=names,
            cfg=cfg,
            seed=seed,
            source="synthetic",
        )

    if s.noise > 1.0:
        raise DataError(
            f"data.synthetic.noise={s.noise} is a label-flip fraction for classification and "
            "must be <= 1; use e.g. 0.1"
        )
    if s.n_classes > 2**s.n_informative:
        raise DataError(
            f"data.synthetic.n_classes={s.n_classes} needs at least "
            f"{(s.n_classes - 1).bit_length()} informative features (got n_informative="
            f"{s.n_informative}); raise n_informative"
        )
    # make_classification places 2 clusters per class on hypercube vertices; fall back to one
    # cluster per class when 2 * n_classes vertices do not exist.
    clusters = 2 if 2 * s.n_classes <= 2**s.n_informative else 1
    x, y = make_classification(
        n_samples=s.n_samples,
        n_features=s.n_features,
        n_informative=s.n_informative,
        n_redundant=min(2, s.n_features - s.n_informative),
        n_classes=s.n_classes,
        n_clusters_per_class=clusters,
        flip_y=s.noise,
        random_state=seed,
    )
    return tabular_bundle(
        x,
        y,
        task="classification",
        class_names=[str(i) for i in range(s.n_classes)],
        feature_names=names,
        cfg=cfg,
        seed=seed,
        source="synthetic",
    )

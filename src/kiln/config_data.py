"""Config sections for data: the source, its split and batching, and source-specific options.

Re-exported by :mod:`kiln.config`; import them from there. This module imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kiln.config_base import _did_you_mean, _Strict

__all__ = ["DataConfig", "SyntheticConfig", "TextConfig"]


class SyntheticConfig(_Strict):
    """Generated data (``data.name=synthetic``), made with scikit-learn's generators."""

    task: Literal["classification", "regression"] = "classification"
    n_samples: int = Field(1000, ge=10)
    n_features: int = Field(20, ge=1)
    n_classes: int = Field(2, ge=2)
    n_informative: int = Field(10, ge=1)
    noise: float = Field(0.1, ge=0.0)


class TextConfig(_Strict):
    """Character-level language-model data (``data.name=text``, ``data.path=corpus.txt``)."""

    block_size: int = Field(64, ge=2)
    stride: int | None = Field(None, ge=1, description="window step; default = block_size")


class DataConfig(_Strict):
    """Where examples come from and how they are split and batched.

    ``name`` is one of ``digits``, ``sklearn:<dataset>`` (e.g. ``sklearn:wine``), ``csv``,
    ``images`` (a folder with one subfolder per class), ``synthetic``, ``text`` or
    ``digits_multitask`` (two targets per example: the digit and its parity) or ``topics``
    (short texts in four topics, tokenised for MiniLM; or a ``label<TAB>text`` file as ``path``).
    """

    name: str = "digits"
    path: str | None = None
    target: str | None = Field(None, description="CSV: name of the label/target column")
    task: Literal["auto", "classification", "regression"] = "auto"
    layout: Literal["auto", "flat", "image"] = Field(
        "auto", description="digits: flat 8x8=64 features (MLP) or 1x32x32 images (CNN)"
    )
    image_size: int = Field(32, ge=4)
    standardize: bool = True
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int | None = Field(
        None,
        description="seed of the train/val/test split (default: the run's seed); fix it to "
        "train a seed ensemble whose members hold out the same examples",
    )
    classes: list[int] | None = Field(
        None, description="keep only these classes, renumbered 0..k-1 in this order"
    )
    train_per_class: int | None = Field(
        None, ge=1, description="keep this many labelled training examples per class (seeded)"
    )
    max_tokens: int = Field(32, ge=2, description="topics: tokens per text, special ones included")
    tokenizer: str | None = Field(
        None, description="topics: a model folder whose tokenizer.json is used (default MiniLM)"
    )
    parity_noise: float = Field(
        0.0, ge=0.0, le=0.5, description="digits_multitask: fraction of train parity labels flipped"
    )
    num_workers: int = Field(0, ge=0)
    persistent_workers: bool = False
    pin_memory: Literal["auto"] | bool = "auto"
    drop_last: bool = False
    synthetic: SyntheticConfig = SyntheticConfig()
    text: TextConfig = TextConfig()

    @field_validator("name")
    @classmethod
    def _known_source(cls, v: str) -> str:
        known = ["digits", "digits_multitask", "csv", "images", "synthetic", "text", "topics"]
        if v in known or v.startswith("sklearn:"):
            return v
        raise ValueError(
            f"unknown data source {v!r}; allowed: {', '.join(known)}, sklearn:<name>"
            + _did_you_mean(v, [*known, "sklearn:"])
        )

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (got {self.val_fraction} + "
                f"{self.test_fraction}); lower one of them to leave examples for training"
            )
        if self.name in ("csv", "images", "text") and not self.path:
            raise ValueError(f"data.name={self.name} needs data.path=<file or folder>")
        if self.name == "csv" and not self.target:
            raise ValueError("data.name=csv needs data.target=<label column name>")
        return self

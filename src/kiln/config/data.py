"""Config sections for data: the source, its split and batching, and source-specific options.

Re-exported by :mod:`kiln.config`; import them from there. This module imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kiln.config.base import _Strict, did_you_mean

__all__ = ["INT32_MAX", "MAX_BATCH", "MAX_SEED", "DataConfig", "SyntheticConfig", "TextConfig"]

# Upper bounds of sizes that become allocations or processes: a typo (an extra zero, 1e23) is
# refused with the key instead of exhausting the machine. Each is far above any real use.
INT32_MAX = 2**31 - 1
#: Examples in one batch (16.7M).
MAX_BATCH = 2**24
#: Tokens in one sequence.
MAX_LENGTH = 1 << 20
#: Seeds go to numpy and scikit-learn, which take 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


class SyntheticConfig(_Strict):
    """Generated data (``data.name=synthetic``), made with scikit-learn's generators."""

    task: Literal["classification", "regression"] = "classification"
    n_samples: int = Field(1000, ge=10, le=10_000_000)
    n_features: int = Field(20, ge=1, le=100_000)
    n_classes: int = Field(2, ge=2, le=100_000)
    n_informative: int = Field(10, ge=1, le=100_000)
    noise: float = Field(0.1, ge=0.0)


class TextConfig(_Strict):
    """Character-level language-model data (``data.name=text``, ``data.path=corpus.txt``)."""

    block_size: int = Field(64, ge=2, le=MAX_LENGTH)
    stride: int | None = Field(
        None, ge=1, le=MAX_LENGTH, description="window step; default = block_size"
    )


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
    image_size: int = Field(32, ge=4, le=4096)
    standardize: bool = True
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="seed of the train/val/test split (default: the run's seed); fix it to "
        "train a seed ensemble whose members hold out the same examples",
    )
    classes: list[int] | None = Field(
        None, description="keep only these classes, renumbered 0..k-1 in this order"
    )
    train_per_class: int | None = Field(
        None,
        ge=1,
        le=INT32_MAX,
        description="keep this many labelled training examples per class (seeded)",
    )
    max_tokens: int = Field(
        32, ge=2, le=MAX_LENGTH, description="topics: tokens per text, special ones included"
    )
    tokenizer: str | None = Field(
        None, description="topics: a model folder whose tokenizer.json is used (default MiniLM)"
    )
    parity_noise: float = Field(
        0.0, ge=0.0, le=0.5, description="digits_multitask: fraction of train parity labels flipped"
    )
    num_workers: int = Field(0, ge=0, le=256, description="loader worker processes")
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
            f"unknown data source {v!r}; {did_you_mean(v, [*known, 'sklearn:'])}allowed: "
            f"{', '.join(known)}, sklearn:<name>"
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

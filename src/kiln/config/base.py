"""Base pydantic model of every Kiln config section and the did-you-mean helper (no torch).

Every section derives from :class:`_Strict`: unknown keys are refused, and every number in it
(fields, and numbers inside lists and dicts such as ``model.kwargs``) must be finite and fit in
a signed 64-bit integer. A config value ends up in tensors, seeds and array sizes, where
``.inf``, ``nan`` or ``2**70`` would fail late and far from the key that caused it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["INT64_MAX", "_Strict", "check_numbers", "did_you_mean", "suggest"]

INT64_MAX = 2**63 - 1


def check_numbers(value: Any) -> None:
    """Raise ValueError when ``value`` holds a non-finite float or an int outside int64.

    Walks lists, tuples and dicts without recursion (their depth is bounded by the YAML
    reader, but a Python caller may pass anything).

    Example:
        >>> check_numbers({"width": [1, 2.5]})
        >>> check_numbers([float("inf")])
        Traceback (most recent call last):
        ...
        ValueError: inf is not a finite number; use a finite value
    """
    stack = [value]
    seen = 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > 1_000_000:  # a Python caller's huge or cyclic container: stop checking
            raise ValueError("holds more than a million values")
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                shown = str(v) if v.bit_length() < 200 else f"an integer of {v.bit_length()} bits"
                raise ValueError(f"{shown} does not fit in a 64-bit integer")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{v} is not a finite number; use a finite value")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


class _Strict(BaseModel):
    # allow_inf_nan=False: float fields refuse inf/nan, also given as text (".inf", "nan").
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _finite_int64(cls, v: Any, info: ValidationInfo) -> Any:
        # "before": a float field must not silently turn 2**70 into 1.18e21.
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return v  # a section checks its own fields, so the message names the exact key
        check_numbers(v)
        return v


def did_you_mean(word: object, choices: Sequence[str], *, prefix: str = "") -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (:func:`suggest`), else ``""``.

    Every "unknown name" message in Kiln uses it the same way: after ``"; "`` and before the
    list of allowed names, so the message reads the same with and without a hint. ``prefix``
    goes before the suggested name (the section of a dotted key, e.g. ``"optim."``).

    Example:
        >>> names = ["mlp", "resnet"]
        >>> f"unknown model 'resnt'; {did_you_mean('resnt', names)}allowed: {', '.join(names)}"
        "unknown model 'resnt'; did you mean 'resnet'? allowed: mlp, resnet"
        >>> did_you_mean("zzz", names)
        ''
        >>> did_you_mean("lr_rate", ["lr", "momentum"], prefix="optim.")
        "did you mean 'optim.lr'? "
    """
    hit = suggest(str(word), list(choices))
    return f"did you mean {prefix + hit!r}? " if hit else ""


def suggest(word: str, choices: Sequence[str]) -> str | None:
    """Closest match to ``word`` among ``choices`` (or None), for "did you mean" hints.

    Example:
        >>> suggest("lr_rate", ["lr", "momentum"])
        'lr'
        >>> suggest("stages.0.brnch", ["stages.0", "stages.0.branch"])
        'stages.0.branch'
    """
    # A user's value may be huge (a pasted blob): difflib is quadratic, and no name is longer.
    word = word[:200]
    # A near-identical choice first: a typo inside a dotted name ("stages.0.0.brnch.bn1") is
    # not its parent module ("stages.0.0"), which the prefix rule below would pick.
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.8)
    if close:
        return close[0]
    # "lr_rate" -> "lr", "batch" -> "batch_size": a choice that starts the word or vice versa.
    lowered = word.lower()
    prefixed = [
        c for c in choices if len(c) >= 2 and (lowered.startswith(c) or c.startswith(lowered))
    ]
    if prefixed:
        return max(prefixed, key=len)
    hits = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return hits[0] if hits else None

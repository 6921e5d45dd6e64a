"""Base pydantic model of every Kiln config section and the did-you-mean helper (no torch)."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict

__all__ = ["_Strict", "suggest"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _did_you_mean(word: str, choices: list[str]) -> str:
    hit = suggest(word, choices)
    return f"; did you mean {hit!r}?" if hit else ""


def suggest(word: str, choices: list[str]) -> str | None:
    """Closest match to ``word`` among ``choices`` (or None), for "did you mean" hints."""
    # "lr_rate" -> "lr", "batch" -> "batch_size": a choice that starts the word or vice versa.
    lowered = word.lower()
    prefixed = [
        c for c in choices if len(c) >= 2 and (lowered.startswith(c) or c.startswith(lowered))
    ]
    if prefixed:
        return max(prefixed, key=len)
    hits = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return hits[0] if hits else None

"""Messages for invalid configs: the dotted key, the bad value (never whole), allowed values.

Used by :func:`kiln.config.validate`. Values are shown with :func:`kiln.errors.short_repr`, so a
huge value (a long list, a shared YAML alias) costs nothing to describe. No torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from kiln.config.base import did_you_mean
from kiln.errors import short_repr

__all__ = ["format_error"]


def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at ``path`` (a tuple of keys) inside ``model``."""
    current: Any = model
    for key in path:
        fields = getattr(current, "model_fields", None)
        if fields is None or key not in fields:
            return []
        current = fields[key].annotation
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _allowed(model: type[BaseModel], path: tuple[str | int, ...]) -> str:
    """A short 'allowed: ...' text for the field at ``path`` when it has a closed set of values."""
    current: Any = model
    field = None
    for key in path:
        fields = getattr(current, "model_fields", None)
        if fields is None or key not in fields:
            return ""
        field = fields[key]
        current = field.annotation
    if field is None:
        return ""
    args = getattr(field.annotation, "__args__", None)
    if getattr(field.annotation, "__origin__", None) is Literal and args:
        return "allowed: " + ", ".join(str(a) for a in args)
    return ""


#: Problems listed in one error message; the rest are counted.
_MAX_SHOWN = 10


def format_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One message for every problem pydantic found (the first few, then a count)."""
    lines = []
    errors = exc.errors()
    for err in errors[:_MAX_SHOWN]:
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        path = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            names = _field_names(root, parent)
            full = [".".join([*map(str, parent), n]) for n in names]
            did = did_you_mean(key, names, prefix="".join(f"{p}." for p in parent))
            msg = f"unknown key {short_repr(path)}"
            if did:
                msg += f"; {did.rstrip()}"
            elif full:
                msg += f"; allowed here: {', '.join(full)}"
            lines.append(msg)
            continue
        value = err.get("input")
        # short_repr: the value may be huge (a long list, a shared alias) - never repr it whole.
        shown = short_repr(value) if not isinstance(value, dict) else "{...}"
        why = err["msg"].removeprefix("Value error, ")
        allowed = _allowed(root, loc)
        text = f"{path}: {why} (got {shown})"
        if allowed and allowed not in text:
            word = value if isinstance(value, str) else short_repr(value)
            names = [a.strip() for a in allowed[9:].split(",")]
            text += f"; {did_you_mean(word, names)}{allowed}"
        lines.append(text)
    if len(errors) > _MAX_SHOWN:
        lines.append(f"... and {len(errors) - _MAX_SHOWN} more problems")
    return (
        "invalid config: " + "; ".join(lines)
        if len(lines) == 1
        else "invalid config:\n  " + ("\n  ".join(lines))
    )

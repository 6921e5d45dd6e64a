"""Request validation shared by ``kiln serve`` and the generated TorchServe handler.

One set of rules for a ``/predict`` body, so the two servers cannot drift apart: the JSON must
parse without NaN/Infinity and without blowing the recursion limit (else 400); ``inputs`` must
be a rectangle of numbers (no strings, booleans or nulls) whose every value is finite *and
within float32's range*, so ``1e39`` (which would become ``inf``) and ``10**400`` (which makes
``math.isfinite`` raise ``OverflowError``) are refused (422); and its shape must be one example
or a non-empty list of examples.

This file imports only the standard library: :mod:`kiln.deploy.torchserve.archive` packs a copy
of it beside the generated TorchServe handler, which imports it (that handler must not need kiln).

Example:
    >>> check_inputs({"inputs": [[1, 2], [3, 4]]}, (2,))
    ((2, 2), False)
    >>> try:
    ...     check_inputs({"inputs": [1e39, 0]}, (2,))
    ... except InputError as exc:
    ...     print(exc.status, exc)
    422 inputs must be finite numbers within float32's range
"""

import json
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: a larger input would become ``inf`` in the model."""


class InputError(ValueError):
    """A request body the client must fix; ``status`` is the HTTP status to answer (400 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        """Remember the status and message."""
        super().__init__(message)
        self.status = status


def _no_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: Any) -> Any:
    """Parse a request body (bytes or str); 400 for invalid JSON, NaN/Infinity or deep nesting.

    A body that is not bytes or str (TorchServe may hand over an already-decoded dict) is
    returned as it is.
    """
    if not isinstance(raw, (bytes, bytearray, str)):
        return raw
    if not raw.strip():
        raise InputError(400, 'empty body; send JSON {"inputs": [...]}')
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # RecursionError: "[[[[..." deeper than the interpreter's limit.
        raise InputError(400, f"invalid JSON: {exc}") from None


def shape_of(value: Any) -> tuple[int, ...]:
    """The nested-list shape of ``value``, checking it is a rectangle of float32-range numbers.

    Raises:
        InputError: 422 for strings, booleans, null, ragged lists or out-of-range numbers.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, dict)):
        raise InputError(422, f"inputs must hold numbers only; found {type(value).__name__}")
    if isinstance(value, (int, float)):
        # False for NaN and inf, and exact (no OverflowError) for integers of any size.
        if not abs(value) <= FLOAT32_MAX:
            raise InputError(422, "inputs must be finite numbers within float32's range")
        return ()
    if not isinstance(value, list):
        raise InputError(422, f"inputs must be nested lists; found {type(value).__name__}")
    if not value:
        return (0,)
    inner = shape_of(value[0])
    for item in value[1:]:
        if shape_of(item) != inner:
            raise InputError(422, "inputs are ragged: nested lists differ in length")
    return (len(value), *inner)


def check_inputs(body: Any, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """Validate a decoded ``/predict`` body; returns the shape of ``inputs`` and single-ness.

    Args:
        body: the decoded JSON.
        input_shape: one example's shape, e.g. ``(64,)``.

    Returns:
        ``(shape, single)``: ``single`` is True when ``inputs`` is one example.

    Raises:
        InputError: 422 naming the expected shape when the body does not fit.
    """
    want = list(input_shape)
    if not isinstance(body, dict) or "inputs" not in body:
        raise InputError(
            422,
            f'expected a JSON object {{"inputs": ...}} with shape {want} '
            f"or [n, {', '.join(map(str, want))}]",
        )
    try:
        shape = shape_of(body["inputs"])
    except RecursionError:
        raise InputError(422, "inputs are nested too deeply") from None
    if shape == tuple(input_shape):
        return shape, True
    if len(shape) == len(input_shape) + 1 and shape[1:] == tuple(input_shape):
        if shape[0] == 0:
            raise InputError(422, "inputs is an empty list of examples")
        return shape, False
    raise InputError(
        422,
        f"inputs has shape {list(shape)}; expected {want} (one example) or "
        f"[n, {', '.join(map(str, want))}] (a list of examples)",
    )

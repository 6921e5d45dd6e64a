"""The bad ``/predict`` bodies both servers must refuse alike: ``kiln serve`` and the handler.

One table, for an input shape of ``(64,)``: ``(id, body, status)``. ``tests/deploy/test_serve.py``
sends each over HTTP to ``kiln serve``; ``tests/deploy/test_serve_validation.py`` hands each to
the generated TorchServe handler's ``handle()``. The statuses must match, so the two cannot drift.
"""

from __future__ import annotations

import json

import pytest

INPUT_SHAPE = (64,)


def _body(inputs: object) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


BAD_INPUTS: list[tuple[str, bytes, int]] = [
    ("too-short", _body([0.5] * 63), 422),
    ("strings", _body(["a"] * 64), 422),
    ("numeric-strings", _body(["1.5"] * 64), 422),
    ("nulls", _body([None] * 64), 422),
    ("booleans", _body([True] * 64), 422),
    ("ragged", _body([[0.5] * 64, [0.5] * 63]), 422),
    ("dict-in-list", _body([{"a": 1}] * 64), 422),
    ("beyond-float32", b'{"inputs": [' + b"1e39, " * 63 + b"1e39]}", 422),
    ("beyond-float32-negative", _body([-1e39] + [0.0] * 63), 422),
    ("huge-integer", b'{"inputs": [' + str(10**400).encode() + b"" + b", 0" * 63 + b"]}", 422),
    ("no-inputs-key", b'{"x": 1}', 422),
    ("top-level-list", b"[1]", 422),
    ("empty-list", _body([]), 422),
    ("nan-literal", b'{"inputs": [NaN' + b", 0" * 63 + b"]}", 400),
    ("infinity-literal", b'{"inputs": [Infinity' + b", 0" * 63 + b"]}", 400),
    ("empty-body", b"", 400),
    ("not-json", b"{" * 10 + b"not json", 400),
    ("deep-nesting", b"[" * 100000, 400),
]

BAD_INPUT_PARAMS = [pytest.param(body, status, id=name) for name, body, status in BAD_INPUTS]

"""Property: any list of ``key=value`` overrides gives a valid Config or a ConfigError, fast.

Keys are drawn from the real dotted keys of :class:`kiln.config.Config` (and from garbage);
values from YAML-looking texts: huge, negative and non-finite numbers, lists, mappings, aliases,
quotes, control characters. ``load_config`` must never raise anything but ``ConfigError`` (a
``KilnError``, exit 2), and it never writes anything.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kiln.config import Config, ConfigError, load_config


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _dotted_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


KEYS = [*_dotted_keys(Config), "model.kwargs.width", "model.kwargs.hidden", "optim.lr_mult.x"]

numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([".inf", "-.inf", ".nan", "nan", "1e23", "1e400", "-0", "0x1F", "2**70"]),
)
scalars = st.one_of(
    numbers,
    st.sampled_from(["", "null", "true", "~", "'", '"', "[", "{", "*a", "&a 1", "!!python/none"]),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "b", "lr"]), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.sampled_from(["a.", ".b", "."]))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


def _assert_sane(cfg: Config) -> None:
    """What every accepted config guarantees: finite int64 numbers, a one-folder run name."""
    stack: list[Any] = [cfg.model_dump()]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            stack += list(v)
        elif isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, int):
            assert -(2**63) <= v < 2**63
    assert cfg.name.strip() and cfg.name not in (".", "..") and Path(cfg.name).name == cfg.name
    assert "\\" not in cfg.name and cfg.out_dir.strip()
    assert 0 <= cfg.seed < 2**32


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_overrides_give_a_config_or_a_config_error(items: list[str]) -> None:
    before = set(Path.cwd().iterdir())
    start = time.perf_counter()
    try:
        cfg = load_config(None, items)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, Config)
        _assert_sane(cfg)
    assert time.perf_counter() - start < 2
    assert set(Path.cwd().iterdir()) == before

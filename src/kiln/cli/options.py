"""Verb options given among a job's overrides as ``<verb>.<name>=value`` (``inspect.bins=20``).

Some verbs take options that are not part of the job config (the finder's range for ``kiln tune
lr``, the Grad-CAM layer for ``kiln inspect``) and too many to be flags. They are words of the
form ``<verb>.<name>=value`` mixed with the ``key.sub=value`` overrides: :func:`take_options`
takes them out, and a pydantic model per verb (:class:`InspectOptions`, :class:`LrFindOptions`,
:class:`BatchFindOptions`, :class:`ProfileOptions`, :class:`BenchCliOptions`) holds their
types, bounds, defaults and help, as :mod:`kiln.config` does for the job. A bad one is a
:class:`kiln.errors.UsageError` (exit 2) naming the option, the value, the allowed values and
the closest name; every problem is reported at once.

Imported by the verbs when they run (pydantic is not needed for ``kiln --help``).

Example:
    >>> values, rest = take_options("inspect", ["c.yaml", "inspect.bins=20", "seed=1"])
    >>> parse_options(InspectOptions, "inspect", values).bins, rest
    (20, ['c.yaml', 'seed=1'])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field, ValidationError, field_validator

from kiln.config.base import _Strict, check_numbers, did_you_mean
from kiln.errors import UsageError, short_repr

__all__ = [
    "BatchFindOptions",
    "BenchCliOptions",
    "InspectOptions",
    "LrFindOptions",
    "ProfileOptions",
    "VerbOptions",
    "parse_options",
    "take_options",
]


class VerbOptions(_Strict):
    """Base of a verb's options: unknown names refused, numbers finite and within int64.

    Example:
        >>> class Demo(VerbOptions):
        ...     steps: int = 1
        >>> Demo.model_validate({"steps": "3"}).steps
        3
    """

    @field_validator("*", mode="after")
    @classmethod
    def _parsed_in_range(cls, v: Any) -> Any:
        # The base checks a value before parsing, when a command-line value is still text.
        check_numbers(v)
        return v


class InspectOptions(VerbOptions):
    """``kiln inspect`` options, as ``inspect.<name>=value``.

    Example:
        >>> InspectOptions(split="val").model_dump()["split"], InspectOptions().bins
        ('val', 40)
    """

    anomaly: bool = Field(False, description="autograd anomaly mode for the backward pass")
    layer: str | None = Field(
        None, description="Grad-CAM layer (default: the last convolutional feature map)"
    )
    mode: Literal["train", "eval"] | None = Field(
        None, description="train or eval (default: eval for a run, train for a config)"
    )
    split: Literal["test", "val", "train"] = Field("test", description="test, val or train")
    batch: int | None = Field(
        None, ge=1, description="examples in the inspected batch (default: one eval batch)"
    )
    samples: int = Field(25, ge=1, description="SmoothGrad: noisy copies per example")
    noise: float = Field(
        0.15, ge=0, description="SmoothGrad: noise std as a fraction of the input range"
    )
    depth: int | None = Field(
        None, ge=1, description="summary rows down to this module depth (default: all)"
    )
    bins: int = Field(40, ge=1, description="histogram bins")


class LrFindOptions(VerbOptions):
    """``kiln tune lr`` options (the range test), as ``tune.<name>=value`` or ``--name value``.

    Example:
        >>> LrFindOptions().end_lr
        10.0
    """

    steps: int = Field(100, description="updates in the sweep")
    start_lr: float = Field(1e-7, description="first learning rate")
    end_lr: float = Field(10.0, description="last learning rate")
    smoothing: float = Field(0.98, description="exponential smoothing of the loss curve")


class BatchFindOptions(VerbOptions):
    """``kiln tune batch`` options, as ``tune.<name>=value`` or ``--name value``.

    Example:
        >>> BatchFindOptions(mode="binary").max_batch is None
        True
    """

    mode: Literal["power", "binary"] = Field(
        "power", description="power (doubling) or binary (then bisect)"
    )
    budget_mb: float | None = Field(None, gt=0, description="memory budget in MiB")
    max_batch: int | None = Field(None, ge=1, description="largest batch size tried")


class ProfileOptions(VerbOptions):
    """``kiln profile`` options, as ``profile.<name>=value``.

    The schedule's bounds are :class:`kiln.perf.profile.Schedule`'s.

    Example:
        >>> ProfileOptions().rows
        10
    """

    wait: int = Field(1, description="updates before the profiler's warm-up")
    warmup: int | None = Field(
        None, description="warm-up updates (default: 1; with --bottleneck, 3 unmeasured)"
    )
    repeat: int = Field(1, description="profiling cycles")
    rows: int = Field(10, ge=1, description="rows per table")


class BenchCliOptions(VerbOptions):
    """``kiln bench`` options, as ``bench.<name>=value``.

    Only their types: the defaults and bounds are :class:`kiln.perf.bench.BenchOptions`'s, which
    gets the options given (``model_dump(exclude_unset=True)``).

    Example:
        >>> BenchCliOptions.model_validate({"steps": "9"}).model_dump(exclude_unset=True)
        {'steps': 9}
    """

    steps: int | None = Field(None, description="the budget, in updates of the baseline")
    warmup: int | None = Field(None, description="updates left out of the step time")
    variants: str | None = Field(None, description="comma list of variants (default: all)")
    tolerance: float | None = Field(None, description="accuracy drop allowed for --apply")
    min_speedup: float | None = Field(None, description="throughput ratio a variant needs")
    compile_min_s: float | None = Field(
        None, description="skip compile when the baseline trains faster than this"
    )


def take_options(prefix: str, args: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Take the ``<prefix>.<name>=value`` words out of ``args``: ``{name: text}`` and the rest.

    Names and values are stripped; a later word wins over an earlier one with the same name.

    Example:
        >>> take_options("tune", ["c.yaml", "tune.steps=5", "optim.lr=1"])
        ({'steps': '5'}, ['c.yaml', 'optim.lr=1'])
    """
    values: dict[str, str] = {}
    rest: list[str] = []
    for arg in args:
        if arg.startswith(prefix + ".") and "=" in arg:
            name, text = arg[len(prefix) + 1 :].split("=", 1)
            values[name.strip()] = text.strip()
        else:
            rest.append(arg)
    return values, rest


M = TypeVar("M", bound=VerbOptions)


def parse_options(model: type[M], prefix: str, values: dict[str, Any]) -> M:
    """Validate ``values`` (text from the command line, or Python values) into ``model``.

    Args:
        model: the verb's options.
        prefix: the verb, as the options are written (``inspect`` for ``inspect.bins=20``).
        values: option name -> value.

    Raises:
        kiln.errors.UsageError: every problem, each naming the option, the value given, the
            allowed values and the closest option name.

    Example:
        >>> parse_options(InspectOptions, "inspect", {"mode": "test"})
        Traceback (most recent call last):
        ...
        kiln.errors.UsageError: inspect.mode: Input should be 'train' or 'eval' (got 'test'); allowed: train, eval
    """  # noqa: E501
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = [_problem(err, model, prefix) for err in exc.errors()]
        if len(problems) == 1:
            raise UsageError(problems[0]) from None
        raise UsageError(f"{len(problems)} bad {prefix} options:\n" + "\n".join(problems)) from None


_PARSED = {"int_parsing": "int", "int_from_float": "int", "float_parsing": "float"}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _problem(err: Any, model: type[VerbOptions], prefix: str) -> str:
    """One problem pydantic found, in the config's style: the option, why, value, allowed."""
    names = list(model.model_fields)
    loc = [str(p) for p in err["loc"]]
    key = loc[0] if loc else ""
    path = f"{prefix}.{key}" if key else prefix
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        did = did_you_mean(key[:200], names, prefix=f"{prefix}.")
        allowed = ", ".join(f"{prefix}.{n}" for n in names)
        return f"unknown {prefix} option {short_repr(key)}; {did}allowed: {allowed}"
    if isinstance(value, str) and err["type"] in _PARSED:
        return f"{path}={short_repr(value)} is not a valid {_PARSED[err['type']]}"
    if isinstance(value, str) and err["type"] == "bool_parsing":
        return f"{path}={short_repr(value)} must be true or false"
    why = err["msg"].removeprefix("Value error, ")
    shown = short_repr(value)
    if isinstance(value, str) and err["type"] in _BOUNDS:
        shown = shown[1:-1]  # text that parsed as a number: show it as the number it is
    text = f"{path}: {why} (got {shown})"
    choices = _choices(model, key)
    if choices:
        text += f"; {did_you_mean(str(value)[:200], choices)}allowed: {', '.join(choices)}"
    return text


def _choices(model: type[VerbOptions], key: str) -> list[str]:
    """The allowed values of a ``Literal`` field (also inside ``X | None``), else none."""
    field = model.model_fields.get(key)
    if field is None:
        return []
    kinds = [field.annotation, *get_args(field.annotation)]
    for kind in kinds:
        if get_origin(kind) is Literal:
            return [str(a) for a in get_args(kind)]
    return []

"""Model targets from files: refused unless the user opted in; checked before any call.

A run directory's ``config.yaml``, a ``model.safetensors``'s ``kiln_config`` metadata and a
checkpoint's ``config`` say how to rebuild the model. A registry name (``model.name=mlp``) maps
to Kiln's own builders and is always fine. An import path (``model.target=pkg.mod:Net``) would
import that module and call that object, so when it comes from a file it is refused *before the
import* unless the user opts in with ``--trust-code`` (Python: ``trust_code=True``, the
convention of ``trust_remote_code``) or named the same path themselves (a ``model.target=``
override on the command line). A run the user trained on their own class stays loadable with
the opt-in.

Whoever chose it, a target is called only when it is an ``nn.Module`` subclass or a plain Python
function (a model factory such as ``torchvision.models:resnet18``) outside Python's standard
library: ``os:system``, ``builtins:exec`` or ``subprocess:run`` are refused uncalled, even with
the opt-in.

Example:
    >>> import collections
    >>> check_model_target(collections.OrderedDict, "collections:OrderedDict")
    Traceback (most recent call last):
    ...
    kiln.errors.ModelError: model.target 'collections:OrderedDict' is the class OrderedDict, \
not an nn.Module subclass; refused without calling it: point it at an nn.Module subclass or \
a function that returns one
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from kiln.errors import ModelError, UnsafeFileError, short_repr

__all__ = ["TRUST_OPTION", "check_model_target", "refuse_file_target"]

#: How the messages name the opt-in, for the CLI and for Python.
TRUST_OPTION = "--trust-code (Python: trust_code=True)"

_FIX = "point it at an nn.Module subclass or a function that returns one"


def refuse_file_target(
    target: str | None,
    source: str | Path,
    *,
    trust_code: bool,
    chosen: Collection[str] = (),
) -> None:
    """Refuse an import path read from ``source`` unless the user opted in or chose it.

    Call this after reading a model config from a file and before building the model: nothing
    is imported here.

    Args:
        target: the file's ``model.target`` (None: a registry name, always fine).
        source: the file it was read from, for the message.
        trust_code: the user's opt-in to running code that files name.
        chosen: import paths the user gave themselves (``model.target=`` overrides).

    Raises:
        UnsafeFileError: ``target`` is set, not chosen and not trusted.

    Example:
        >>> refuse_file_target("os:system", "x.safetensors", trust_code=False)
        Traceback (most recent call last):
        ...
        kiln.errors.UnsafeFileError: x.safetensors names model.target 'os:system', code that \
Kiln would import and call; refused without importing it. If you trust where this file comes \
from (e.g. your own run trained with model.target=pkg.module:Net), pass --trust-code (Python: \
trust_code=True)
    """
    if target is None or trust_code or target in chosen:
        return
    raise UnsafeFileError(
        f"{source} names model.target {short_repr(target)}, code that Kiln would import and "
        "call; refused without importing it. If you trust where this file comes from (e.g. your "
        f"own run trained with model.target=pkg.module:Net), pass {TRUST_OPTION}"
    )


def check_model_target(obj: Any, path: str) -> None:
    """Refuse a target that is neither an ``nn.Module`` subclass nor a model factory, uncalled.

    Args:
        obj: what ``path`` imported.
        path: the import path, for the message.

    Raises:
        ModelError: a class that is not an ``nn.Module``, a builtin (``os:system``), a function
            of Python's standard library (``subprocess:run``), or any other callable object.

    Example:
        >>> import torch
        >>> check_model_target(torch.nn.Linear, "torch.nn:Linear")   # fine: returns None
    """
    from torch import nn  # torch only once a model is actually built

    name = short_repr(path)
    if isinstance(obj, type):
        if issubclass(obj, nn.Module):
            return
        raise ModelError(
            f"model.target {name} is the class {obj.__qualname__}, not an nn.Module subclass; "
            f"refused without calling it: {_FIX}"
        )
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        module = getattr(obj, "__module__", None) or ""
        if module.partition(".")[0] not in sys.stdlib_module_names:
            return
        raise ModelError(
            f"model.target {name} is a function of Python's standard library ({module}), not "
            f"a model; refused without calling it: {_FIX}"
        )
    raise ModelError(
        f"model.target {name} is a {type(obj).__name__}, not an nn.Module subclass or a Python "
        f"function; refused without calling it: {_FIX}"
    )

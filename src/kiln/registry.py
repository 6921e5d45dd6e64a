"""Explicit name -> factory tables, and imports of a user's own class by ``"pkg.module:Name"``.

A config names a built-in model (``model.name=resnet``) or points at the user's code
(``model.target=mypkg.nets:MyNet``). This module turns either into an ``nn.Module``:

* The tables are plain dicts written out below: nothing registers itself at import time, so what
  exists is visible in one place and a typo gets a did-you-mean answer.
* The tables map names to ``"module:function"`` strings that are imported on use, so
  ``import kiln.registry`` (and ``kiln --help``) does not import torch.
* Constructor keyword arguments are checked against the callable's signature before the call,
  and facts the data already knows (input size, classes, vocabulary) are passed only to
  parameters that ask for them by name.

Example:
    >>> from kiln.config import ModelConfig
    >>> from kiln.data.base import DataInfo
    >>> info = DataInfo(task="classification", input_shape=(64,), num_classes=10)
    >>> model = build_model(ModelConfig(name="mlp", kwargs={"hidden": [32]}), info)
    >>> type(model).__name__
    'MLP'
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from kiln.config import did_you_mean
from kiln.trust.targets import check_model_target

if TYPE_CHECKING:
    from torch import nn

    from kiln.config import ModelConfig
    from kiln.data.base import DataInfo

__all__ = ["MODELS", "build_model", "check_kwargs", "data_kwargs", "import_object"]

#: Built-in models: name -> ``"module:builder"``; each builder is ``build_x(info, **kwargs)``.
MODELS: dict[str, str] = {
    "mlp": "kiln.models.mlp:build_mlp",
    "resnet": "kiln.models.resnet:build_resnet",
    "gpt": "kiln.models.gpt:build_gpt",
    "multihead": "kiln.models.multihead:build_multihead",
    "minilm": "kiln.models.text_encoder:build_minilm",
    "bow": "kiln.models.bow:build_bow",
}


def import_object(path: str) -> Any:
    """Import ``"package.module:Name"`` (``Name`` may be dotted, e.g. ``Outer.Inner``).

    Args:
        path: the module's import path, a colon, and the attribute to fetch from it.

    Returns:
        The attribute (usually a class or a factory function).

    Raises:
        ValueError: ``path`` is not of the form ``module:Name``.
        ImportError: the module cannot be imported (it, or a dependency, is missing), or it has
            no such attribute; the message lists similar names.

    Example:
        >>> import_object("collections:OrderedDict").__name__
        'OrderedDict'
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"import path {path!r} must look like 'package.module:Name' (e.g. mypkg.nets:MyNet)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and module_name != missing and not module_name.startswith(missing + "."):
            raise ImportError(
                f"importing module {module_name!r} (for {path!r}) failed: it needs {missing!r}, "
                f"which is not installed; install it in this environment"
            ) from exc
        raise ImportError(
            f"cannot import module {module_name!r} (for {path!r}): no module named {missing!r}. "
            "The module must be importable: install its package (pip install -e .) or add the "
            "folder that contains it to PYTHONPATH"
        ) from exc
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            names = sorted(n for n in dir(obj) if not n.startswith("_"))
            msg = f"{owner!r} has no attribute {part!r} (from {path!r}); "
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            tail = f"names there: {shown}" if names else "it defines no public names"
            msg += did_you_mean(part, names) + tail
            raise ImportError(msg)
        obj = getattr(obj, part)
    return obj


def data_kwargs(info: DataInfo) -> dict[str, Any]:
    """Constructor arguments the data can supply, by conventional parameter name.

    ``out_features`` is the number of outputs the task needs: classes for classification,
    targets for regression, the vocabulary for ``lm``. Values the data does not know are left out.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> kw = data_kwargs(DataInfo("classification", input_shape=(1, 8, 8), num_classes=3))
        >>> kw["in_features"], kw["in_channels"], kw["out_features"]
        (64, 1, 3)
    """
    out: dict[str, Any] = {
        "in_features": math.prod(info.input_shape),
        "input_shape": tuple(info.input_shape),
    }
    if len(info.input_shape) == 3:
        out["in_channels"] = info.input_shape[0]
    if info.num_classes is not None:
        out["num_classes"] = info.num_classes
    if info.vocab_size is not None:
        out["vocab_size"] = info.vocab_size
    if info.task == "lm":
        out["block_size"] = info.input_shape[0]
    outputs = {
        "classification": info.num_classes,
        "regression": info.num_outputs,
        "lm": info.vocab_size,
        "multitask": None,
    }[info.task]
    if outputs is not None:
        out["out_features"] = outputs
    return out


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    """``fn``'s parameters, or None when Python cannot tell (some builtins / C extensions)."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None


def check_kwargs(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    owner: str,
    reserved: Collection[str] = (),
) -> None:
    """Refuse keyword arguments that ``fn`` does not take, naming the closest allowed one.

    Nothing is checked when ``fn`` accepts ``**kwargs`` or its signature cannot be read.

    Args:
        fn: the class or function the arguments are for.
        kwargs: the user's ``model.kwargs``.
        owner: how the error names ``fn`` (``resnet``, ``mypkg.nets:MyNet``).
        reserved: parameters the caller fills itself (a builder's ``info``); never allowed.

    Raises:
        ValueError: a key is not a parameter of ``fn``.

    Example:
        >>> check_kwargs(lambda width=16: None, {"widht": 8}, "net")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: model.kwargs.widht is not an argument of net; did you mean 'width'? ...
    """
    params = _parameters(fn)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [
        n
        for n, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in reserved
    ]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"model.kwargs.{key} is not an argument of {owner}; {did_you_mean(key, allowed)}"
                f"allowed: {', '.join(allowed) or '(none)'}"
            )


def _resolve_builtin(name: str) -> Callable[..., Any]:
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; {did_you_mean(name, list(MODELS))}"
            f"allowed: {', '.join(MODELS)}; "
            "or set model.target=pkg.module:Class"
        )
    fn: Callable[..., Any] = import_object(MODELS[name])
    return fn


def build_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """Build the network a config asks for, sized by the data.

    With ``cfg.target`` set, the user's class (or factory) is checked (an ``nn.Module`` subclass
    or a Python function outside the standard library, see :mod:`kiln.trust`) and called with
    ``cfg.kwargs`` plus every :func:`data_kwargs` entry whose name is a parameter of its
    signature and that the user did not give (the user's value wins). Otherwise ``cfg.name`` is
    looked up in :data:`MODELS` and its builder is called as ``build_x(info, **cfg.kwargs)``.

    Args:
        cfg: ``name``, optional ``target`` and ``kwargs`` of the model.
        info: what the data says about inputs and outputs.

    Returns:
        The model, on the CPU, in training mode.

    Raises:
        ValueError: unknown name, an argument the constructor does not take, or a value the
            constructor refuses.
        TypeError: the constructor rejected an argument's type, or the target did not return an
            ``nn.Module``.
        ImportError: ``cfg.target`` cannot be imported.
        kiln.errors.ModelError: ``cfg.target`` is not an ``nn.Module`` subclass or a model
            factory (refused before it is called).

    Example:
        >>> from kiln.config import ModelConfig
        >>> from kiln.data.base import DataInfo
        >>> info = DataInfo(task="classification", input_shape=(1, 8, 8), num_classes=4)
        >>> net = build_model(ModelConfig(name="resnet", kwargs={"width": 8}), info)
        >>> net.fc.out_features
        4
    """
    from torch import nn  # torch only once a model is actually built

    if cfg.target is not None:
        owner = cfg.target
        fn: Callable[..., Any] = import_object(cfg.target)
        if not callable(fn):
            raise TypeError(
                f"model.target {owner!r} is of type {type(fn).__name__!r}, not a class or function;"
                " point it at an nn.Module subclass or a function that returns one"
            )
        check_model_target(fn, owner)  # before any call: os:system is refused uncalled
        check_kwargs(fn, cfg.kwargs, owner)
        params = _parameters(fn) or {}
        injected = {k: v for k, v in data_kwargs(info).items() if k in params}
        positional: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {**injected, **cfg.kwargs}  # the user's values win
    else:
        owner = cfg.name
        fn = _resolve_builtin(cfg.name)
        check_kwargs(fn, cfg.kwargs, owner, reserved=("info",))
        positional, kwargs = (info,), dict(cfg.kwargs)
    try:
        model = fn(*positional, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"building model {owner!r} with kwargs {cfg.kwargs} failed: {exc}; "
            "check model.kwargs against its signature and types"
        ) from exc
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model {owner!r} returned {type(model).__name__!r}, not a torch.nn.Module; "
            "point model.target at an nn.Module subclass or a function that returns one"
        )
    return model

"""Load pretrained weights into a model from any common layout, and say exactly what loaded.

Weights come as a Kiln run directory (its ``model.safetensors``), a ``.safetensors`` file, a
pickled state dict (``.pt``/``.pth``/``.bin``, possibly wrapped as ``{"state_dict": ...}`` or
``{"model": ...}``), or a local Hugging Face model directory (``model.safetensors``, sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``). Their key names rarely match the
target model's exactly: DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.`` (both removed
here always), and other code bases use other prefixes. :func:`load_pretrained` renames the keys,
loads those that fit and returns a :class:`LoadReport` of loaded, missing, unexpected and
shape-mismatched keys, so a silent partial load cannot pass for a full one. Pickled files are
read with ``torch.load(weights_only=True)``: no code in a downloaded file runs.
Fine-tuning the loaded weights usually wants smaller learning rates for the earlier layers:
:func:`layerwise_lr_decay` gives ``optim.lr_mult`` for that.

Example:
    >>> import torch
    >>> from torch import nn
    >>> src = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> dst = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    >>> wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}  # saved from DDP
    >>> print(load_pretrained(dst, wrapped, strict=False))
    loaded 2 of 4 model keys from a state dict
      mismatched (2): 1.bias (source (2,), model (3,)), 1.weight (source (2, 4), model (3, 4))
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.safeio.tensorfile import dtype_kind

__all__ = [
    "LoadReport",
    "layer_groups",
    "layerwise_lr_decay",
    "load_pretrained",
    "read_state_dict",
]

# Prefixes that wrappers add to every key: DDP/DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PICKLED = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` loaded; ``print()`` it for a summary.

    Attributes:
        source: where the weights came from.
        loaded: model keys that received a value (a tied weight counts under each name).
        missing: model keys the source has no value for (they keep their current values).
        unexpected: source keys (after renaming) the model does not have.
        mismatched: ``(key, source shape, model shape)`` for keys present in both with
            different shapes (not loaded).

    Example:
        >>> LoadReport("x.pt", loaded=("fc.weight",), missing=("fc.bias",)).ok
        False
    """

    source: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    hint: str = field(default="", compare=False)

    @property
    def ok(self) -> bool:
        """Every model key loaded and every source key used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        lines = [f"loaded {len(self.loaded)} of {total} model keys from {self.source}"]

        def part(label: str, items: Sequence[str]) -> None:
            if items:
                shown = ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
                lines.append(f"  {label} ({len(items)}): {shown}")

        part("missing", self.missing)
        part("unexpected", self.unexpected)
        part("mismatched", [f"{k} (source {s}, model {m})" for k, s, m in self.mismatched])
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def _state_dict_in(obj: Any, origin: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, or of the one under ``state_dict``/``model`` in ``obj``."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{origin} is not a state dict of tensors (keys {', '.join(map(str, bad[:5]))} are "
            "not tensors); pass the weights' dict itself, e.g. checkpoint['model']"
        )
    return dict(obj)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one file, checked before any library reads it (:mod:`kiln.safeio`)."""
    if path.suffix == ".safetensors":
        from kiln.safeio.tensorfile import load_file

        return load_file(path)[0]
    if path.suffix in _PICKLED:
        from kiln.safeio.torchfile import torch_load

        # Sizes are checked before torch.load; a pickle that imports anything is refused.
        return _state_dict_in(torch_load(path, map_location="cpu"), str(path))
    raise ValueError(
        f"unknown weights file type {path.suffix!r} ({path}); expected .safetensors or "
        f"{', '.join(_PICKLED)}"
    )


def _read_index(index: Path) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json``, each a file beside it."""
    from kiln.errors import CorruptFileError, UnsafeFileError

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFileError(
            f"{index} is corrupt ({type(e).__name__}); it must be JSON with a 'weight_map' of "
            "tensor name -> shard file"
        ) from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise UnsafeFileError(
                f"refused to read {index}: shard {str(shard)[:80]!r} is not a file beside it"
            )
    return shards


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored at ``source`` (a file or a run / Hugging Face directory), on CPU.

    A directory is searched for ``model.safetensors`` (a Kiln run or a Hugging Face model),
    ``model.safetensors.index.json`` (sharded) and ``pytorch_model.bin``, in that order.

    Raises:
        FileNotFoundError: nothing there, or a directory without weights (the message lists
            its files).
        ValueError: an unknown file type, or a file that is not a state dict.

    Example:
        >>> read_state_dict("runs/digits")["fc.weight"].shape  # doctest: +SKIP
        torch.Size([10, 32])
    """
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no weights at {path}: no such file or directory")
    if (path / "model.safetensors").is_file():
        return _read_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in _read_index(index):
            out.update(_read_file(path / shard))
        return out
    if (path / "pytorch_model.bin").is_file():
        return _read_file(path / "pytorch_model.bin")
    files = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path} "
        f"(files: {', '.join(files[:10]) or 'none'}); for a Kiln run that has not finished, "
        "use consolidate_checkpoint() on its checkpoint"
    )


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key.replace("._orig_mod.", ".")


def _rename(
    keys: Sequence[str],
    strip_prefix: str | Sequence[str] | None,
    add_prefix: str | None,
    rename: Mapping[str, str] | None,
) -> dict[str, str]:
    """New name -> old name, after the wrapper prefixes, strip, add and regex renames."""
    strips = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or ())
    out: dict[str, str] = {}
    for old in keys:
        new = _strip_wrappers(old)
        for prefix in strips:
            if new.startswith(prefix):
                new = new[len(prefix) :]
                break
        new = (add_prefix or "") + new
        for pattern, repl in (rename or {}).items():
            new = re.sub(pattern, repl, new)
        if new in out:
            raise ValueError(
                f"source keys {out[new]!r} and {old!r} both become {new!r} after renaming; "
                "make the rename rules more specific"
            )
        out[new] = old
    return out


def _prefix_hint(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """Suggest strip_prefix / add_prefix when the two lists differ by one prefix."""
    for m in missing:
        for u in unexpected:
            if u.endswith("." + m):
                return f"source keys have an extra prefix: try strip_prefix={u[: -len(m)]!r}"
            if m.endswith("." + u):
                return f"model keys have an extra prefix: try add_prefix={m[: -len(u)]!r}"
    return ""


def _tied_names(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict names that are one tensor (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(b), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    strip_prefix: str | Sequence[str] | None = None,
    add_prefix: str | None = None,
    rename: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    origin: str | None = None,
) -> LoadReport:
    """Copy weights from ``source`` into ``model`` (in place), renaming keys to fit.

    Each source key is renamed in this order: the wrapper prefixes ``module.`` (DDP) and
    ``_orig_mod.`` (``torch.compile``) are removed, then the first matching ``strip_prefix``,
    then ``add_prefix`` is prepended, then every ``rename`` rule is applied with ``re.sub``
    (``{r"^encoder\\.": "backbone."}`` maps a prefix, ``{r"\\.gamma$": ".weight"}`` a suffix).
    Values are copied into the model's tensors (cast to their dtype, on their device). A tied
    weight (the GPT's embedding and head) counts as loaded under all its names when any of
    them is in the source, as in files written by ``safetensors``' ``save_model``.

    With ``strict=True`` (the default) any missing, unexpected or shape-mismatched key raises
    before anything is copied; ``skip_mismatched=True`` lets mismatched keys pass (a new head
    with another number of classes) while missing and unexpected keys still raise. With
    ``strict=False`` whatever matches is loaded and the rest is only reported.

    Args:
        model: the model to load into.
        source: a Kiln run directory, a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file,
            a Hugging Face model directory, or a state dict.
        strict: raise unless every key matches.
        strip_prefix: prefix (or prefixes, first match wins) removed from source keys.
        add_prefix: prefix added to source keys.
        rename: ``{regex: replacement}`` rules applied in order to source keys.
        skip_mismatched: with ``strict``, allow shape-mismatched keys (not loaded).
        origin: what to call a state-dict ``source`` in the report and messages (its file).

    Returns:
        The :class:`LoadReport`.

    Raises:
        ValueError: with ``strict``, the report of what did not match (with a prefix hint when
            one fits); also two source keys renamed to one name, or an unreadable file.
        kiln.errors.ModelError: a source tensor of another dtype kind (integer for float).
        FileNotFoundError: ``source`` has no weights.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> saved = {"backbone.0.weight": torch.ones(2, 2), "backbone.0.bias": torch.zeros(2)}
        >>> load_pretrained(net, saved, strip_prefix="backbone.").ok, net[0].weight.sum().item()
        (True, 4.0)
    """
    if isinstance(source, Mapping):
        origin, raw = origin or "a state dict", _state_dict_in(source, "source")
    else:
        origin, raw = str(source), read_state_dict(source)
    names = _rename(list(raw), strip_prefix, add_prefix, rename)
    target = model.state_dict(keep_vars=True)
    loaded: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    values: dict[str, torch.Tensor] = {}
    kinds: list[str] = []  # float weights stored as integers (or back): never cast silently
    for new, old in names.items():
        if new not in target:
            continue
        src_shape, dst_shape = tuple(raw[old].shape), tuple(target[new].shape)
        if dtype_kind(raw[old].dtype) != dtype_kind(target[new].dtype):
            kinds.append(f"{new} ({raw[old].dtype} in the source, {target[new].dtype} here)")
        elif src_shape != dst_shape:
            mismatched.append((new, src_shape, dst_shape))
        else:
            values[new] = raw[old]
            loaded.append(new)
    if kinds:
        from kiln.errors import ModelError

        raise ModelError(
            f"weights from {origin} have the wrong kind of dtype for {type(model).__name__}: "
            f"{', '.join(kinds[:4])}{' ...' if len(kinds) > 4 else ''}; the file is damaged or "
            "holds other tensors under these names"
        )
    for group in _tied_names(model):
        if group & set(loaded):
            loaded += sorted(n for n in group - set(loaded) if n in target)
    bad = {m[0] for m in mismatched}
    missing = sorted(k for k in target if k not in loaded and k not in bad)
    unexpected = sorted(n for n in names if n not in target)
    report = LoadReport(
        source=origin,
        loaded=tuple(sorted(loaded)),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(sorted(mismatched)),
        hint=_prefix_hint(missing, unexpected),
    )
    if strict and (missing or unexpected or (mismatched and not skip_mismatched)):
        raise ValueError(
            f"weights from {origin} do not fit {type(model).__name__}:\n{report}\n"
            "fix the key names (strip_prefix=, add_prefix=, rename=), or pass strict=False to "
            "load what matches (skip_mismatched=True to only ignore shape mismatches)"
        )
    # load_state_dict (not a plain copy_) so modules' own loading hooks run.
    model.load_state_dict(values, strict=False)
    return report


# --------------------------------------------------------------------------- layer-wise LR
# Fine-tuning pretrained weights: deeper layers (closer to the new task) get larger LRs.


def _own_params(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _globs(prefix: str, module: nn.Module) -> list[str]:
    return [f"{prefix}.*"] if _has_params(module) else []


def layer_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameter-name globs grouped by depth, input side first, head last.

    * Kiln's ResNet: ``stem``, then each block (``stages.<i>.<j>``), then the head (``fc``).
    * Kiln's GPT: the embeddings (``tok_emb``, ``pos_emb``), each ``blocks.<i>``, then
      ``ln_f`` with ``lm_head``.
    * Any other model: its direct children with parameters in registration order, where an
      ``nn.Sequential`` or ``nn.ModuleList`` child is split into its own children; parameters
      the root owns directly join the first group. The last group is the head.

    Example:
        >>> from kiln.models import GPT
        >>> layer_groups(GPT(vocab_size=8, block_size=4, n_layer=2, n_head=1, n_embd=4))
        [['tok_emb.*', 'pos_emb.*'], ['blocks.0.*'], ['blocks.1.*'], ['ln_f.*', 'lm_head.*']]
    """
    from kiln.models.gpt import GPT
    from kiln.models.resnet import ResNet

    if isinstance(model, ResNet):
        blocks = [
            [f"stages.{i}.{j}.*"]
            for i, stage in enumerate(model.stages)
            for j, _ in enumerate(stage)  # type: ignore[arg-type]
        ]
        head = [f"{n}.*" for n in ("drop", "fc") if _has_params(getattr(model, n))]
        return [_globs("stem", model.stem), *blocks, head]
    if isinstance(model, GPT):
        emb = ["tok_emb.*", "pos_emb.*"]
        head = [g for n in ("ln_f", "lm_head") for g in _globs(n, getattr(model, n))]
        return [emb, *[[f"blocks.{i}.*"] for i in range(len(model.blocks))], head]
    groups: list[list[str]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for sub, grand in child.named_children():
                groups += [_globs(f"{name}.{sub}", grand)]
            own = _own_params(child, name)
            if own:
                groups.append(own)
        else:
            groups.append(_globs(name, child))
    groups = [g for g in groups if g]
    root = _own_params(model, "")
    if root:
        groups = [root + groups[0], *groups[1:]] if groups else [root]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no parameters to group")
    return groups


def layerwise_lr_decay(model: nn.Module, decay: float) -> dict[str, float]:
    """LR multipliers that shrink geometrically from the head toward the input.

    With the groups of :func:`layer_groups` ``g_0 .. g_{n-1}`` (``g_{n-1}`` the head), the head
    and the deepest block train at the full LR (x1) and group ``g_i`` below them at
    ``decay ** (n - 2 - i)``: earlier layers, which hold more general features, change less.
    The result is ``optim.lr_mult`` for :class:`kiln.config.OptimConfig` (name glob -> float).
    It is ordered from the head down: :func:`kiln.train.optim.param_groups` gives a parameter
    the first matching glob's multiplier, so a weight tied between the head and the input
    embedding (the GPT's) trains at the head's rate.

    Args:
        model: the model.
        decay: factor per group, in ``(0, 1]`` (0.65-0.9 is typical for fine-tuning).

    Returns:
        ``{glob: multiplier}``, head first.

    Raises:
        ValueError: ``decay`` outside ``(0, 1]``.

    Example:
        >>> from kiln.models import ResNet
        >>> layerwise_lr_decay(ResNet(num_classes=2, depths=(1, 1), width=4), 0.5)
        {'fc.*': 1.0, 'stages.1.0.*': 1.0, 'stages.0.0.*': 0.5, 'stem.*': 0.25}
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r} (e.g. 0.75)")
    groups = layer_groups(model)
    n = len(groups)
    mults: dict[str, float] = {}
    for i in reversed(range(n)):
        for glob in groups[i]:
            mults[glob] = float(decay ** max(0, n - 2 - i))
    return mults

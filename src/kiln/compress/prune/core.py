"""Pruning: zero the smallest weights (unstructured) or remove whole channels (structured).

Unstructured pruning uses ``torch.nn.utils.prune``: a mask per ``Linear``/``Conv`` weight, chosen
by L1 magnitude or at random, per layer (``l1_unstructured`` / ``random_unstructured``) or over
all layers at once (``global_unstructured``). While masks are on, a module holds ``weight_orig``
(a parameter) and ``weight_mask`` (a buffer) and a forward pre-hook recomputes
``weight = weight_orig * weight_mask``; :func:`make_permanent` (``prune.remove``) folds them back
into a plain ``weight``. Structured pruning (:mod:`kiln.compress.prune.structured`) really shrinks
layers.

:func:`prune_model` runs the whole recipe on a model, and the ``kiln prune`` verb on a run:

* ``cycles`` prune + fine-tune cycles reach the final amount **geometrically**: cycle ``i`` of
  ``n`` prunes to ``1 - (1 - amount) ** (i / n)``, i.e. each cycle removes the same fraction of
  what is left (Han et al. 2015; Frankle & Carbin 2019). The last cycle lands exactly on
  ``amount``. Counts are exact: a layer of ``n`` weights ends with ``round(amount * n)`` pruned
  (``scope="layer"``), or all layers together with ``round(amount * total)`` (``"global"``).
* fine-tuning keeps the masks (pruned weights get no update) and is a callable, so a user's own
  loop fits; ``prune_run.trainer_finetune`` is Kiln's Trainer with the run's config.
* lottery-ticket rewind (``initial``): after each pruning step the survivors (and every other
  parameter and buffer) go back to their initial values, then the masked model retrains.
  :func:`kiln.compress.prune.run.initial_state` gives the initial weights of a run.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    >>> _ = prune_unstructured(net, 0.5)
    >>> sparsity(net)["total"]["sparsity"]
    0.5
    >>> _ = make_permanent(net)
    >>> sorted(net.state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from kiln.compress.prune import structured as st
from kiln.compress.prune.io import RECORD as RECORD
from kiln.compress.prune.io import WEIGHTS as WEIGHTS
from kiln.compress.prune.io import load_pruned, save_pruned
from kiln.compress.report import CompressedModel

if TYPE_CHECKING:
    pass

__all__ = [
    "METHODS",
    "SCOPES",
    "Finetune",
    "PruneSpec",
    "load_pruned",
    "make_permanent",
    "prunable_layers",
    "prune_model",
    "prune_unstructured",
    "rewind_",
    "save_pruned",
    "sparsity",
    "sparsity_schedule",
]

METHODS = ("l1", "random")
SCOPES = ("layer", "global")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Finetune = Callable[[nn.Module, int], dict[str, Any]]
"""``finetune(model, cycle) -> metrics``: trains ``model`` in place (masks kept)."""


def _check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(
            f"--amount must be a fraction in [0, 1), got {amount!r}: 0.5 removes half the "
            "weights (or channels); 1 would remove everything"
        )
    return float(amount)


@dataclass(frozen=True)
class PruneSpec:
    """What to prune, checked on construction.

    Attributes:
        amount: final fraction of weights (unstructured) or channels (structured) removed.
        structured: remove whole neurons/channels instead of single weights.
        method: ``l1`` (magnitude) or ``random``; structured also takes ``l2``.
        scope: ``layer`` (each layer loses ``amount``) or ``global`` (the smallest weights of
            all layers together; unstructured only).
        cycles: prune + fine-tune cycles (geometric schedule, see the module docstring).
        seed: random source of ``method="random"``.

    Example:
        >>> PruneSpec(0.5, scope="global").cycles
        1
        >>> PruneSpec(1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --amount must be a fraction in [0, 1), got 1.0: ...
    """

    amount: float
    structured: bool = False
    method: str = "l1"
    scope: str = "layer"
    cycles: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        methods = st.NORMS if self.structured else METHODS
        kind = "structured" if self.structured else "unstructured"
        if self.method not in methods:
            raise ValueError(
                f"unknown {kind} pruning method {self.method!r}; allowed: {', '.join(methods)}"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; allowed: {', '.join(SCOPES)}")
        if self.structured and self.scope == "global":
            raise ValueError(
                "structured pruning removes the same fraction of channels from every layer "
                "(scope=layer); global scope ranks single weights: drop --structured or use "
                "--scope layer"
            )
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"--iterative must be a whole number >= 1, got {self.cycles!r}")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``Conv`` layers whose ``weight`` is pruned (tied weights are left out).

    A weight shared by two modules (a GPT's embedding and head) is skipped: masking it in one
    module would untie it.

    Example:
        >>> [n for n, _ in prunable_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))]
        ['0']
    """
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            w = m.weight if not tprune.is_pruned(m) else getattr(m, "weight_orig", m.weight)
            if count.get(id(w), 1) == 1:
                out.append((name, m))
    return out


def _effective(m: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, fresh (``module.weight`` is stale after a step)."""
    if hasattr(m, "weight_mask"):
        return (m.weight_orig * m.weight_mask).detach()  # type: ignore[operator]
    return m.weight.detach()  # type: ignore[operator]


def _pruned_count(m: nn.Module) -> int:
    mask = getattr(m, "weight_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def prune_unstructured(
    model: nn.Module, amount: float, *, method: str = "l1", scope: str = "layer", seed: int = 0
) -> dict[str, int]:
    """Mask weights until ``amount`` of them are pruned in total (masks already there count).

    Per layer, a weight of ``n`` elements ends with ``round(amount * n)`` masked; globally, all
    layers together end with ``round(amount * total)``. Called again with a larger amount it
    prunes among the survivors only (iterative pruning).

    Args:
        model: pruned in place (``prune.l1_unstructured``/``random_unstructured`` per layer,
            ``prune.global_unstructured`` over all).
        amount: final pruned fraction, in ``[0, 1)``.
        method: ``l1`` (smallest magnitude first) or ``random``.
        scope: ``layer`` or ``global``.
        seed: random source for ``method="random"`` (the global RNG is left as it was).

    Returns:
        Masked elements per layer.

    Example:
        >>> net = nn.Linear(10, 10)
        >>> prune_unstructured(net, 0.3, method="random")
        {'': 30}
    """
    _check_amount(amount)
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    layers = prunable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weight to prune")
    fn = tprune.l1_unstructured if method == "l1" else tprune.random_unstructured
    cls = tprune.L1Unstructured if method == "l1" else tprune.RandomUnstructured
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if scope == "layer":
            for _, m in layers:
                n = _effective(m).numel()
                extra = max(0, round(amount * n) - _pruned_count(m))
                fn(m, "weight", amount=extra)
        else:
            total = sum(_effective(m).numel() for _, m in layers)
            done = sum(_pruned_count(m) for _, m in layers)
            extra = max(0, round(amount * total) - done)
            scores = {(m, "weight"): _effective(m).abs() for _, m in layers}
            params = [(m, "weight") for _, m in layers]
            tprune.global_unstructured(
                params, pruning_method=cls, importance_scores=scores, amount=extra
            )
    return {name: _pruned_count(m) for name, m in layers}


def make_permanent(model: nn.Module) -> nn.Module:
    """``prune.remove`` every mask: plain ``weight`` parameters, no pre-hooks, plain keys.

    Example:
        >>> net = nn.Linear(4, 4)
        >>> _ = prune_unstructured(net, 0.5)
        >>> _ = make_permanent(net)
        >>> sorted(net.state_dict()), len(net._forward_pre_hooks)
        (['bias', 'weight'], 0)
    """
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(m, hook._tensor_name)
    return model


def sparsity(model: nn.Module) -> dict[str, Any]:
    """Zero weights per prunable layer and in total (masked or permanent alike).

    Example:
        >>> net = nn.Linear(4, 5)
        >>> _ = prune_unstructured(net, 0.25)
        >>> sparsity(net)["layers"][""]
        {'shape': [5, 4], 'zeros': 5, 'total': 20, 'sparsity': 0.25}
    """
    layers: dict[str, dict[str, Any]] = {}
    zeros = total = 0
    for name, m in prunable_layers(model):
        w = _effective(m)
        z, n = int((w == 0).sum()), w.numel()
        layers[name] = {"shape": list(w.shape), "zeros": z, "total": n, "sparsity": z / n}
        zeros, total = zeros + z, total + n
    return {
        "layers": layers,
        "total": {"zeros": zeros, "total": total, "sparsity": zeros / max(total, 1)},
    }


def sparsity_schedule(amount: float, cycles: int) -> list[float]:
    """Target pruned fraction after each cycle: ``1 - (1 - amount) ** (i / cycles)``.

    Each cycle removes the same share of the weights still there; the last target is exactly
    ``amount``.

    Example:
        >>> [round(s, 4) for s in sparsity_schedule(0.75, 2)]
        [0.5, 0.75]
    """
    _check_amount(amount)
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    out = [1 - (1 - amount) ** (i / cycles) for i in range(1, cycles)]
    return [*out, amount]


def rewind_(
    model: nn.Module,
    initial: Mapping[str, torch.Tensor],
    *,
    kept: Mapping[str, torch.Tensor] | None = None,
    groups: list[st.Group] | None = None,
) -> nn.Module:
    """Reset every parameter and buffer of a pruned ``model`` to ``initial`` (masks stay).

    Args:
        model: masked (unstructured) or shrunk (structured) model, changed in place.
        initial: the full-size state dict of the unpruned model at initialisation, plain keys.
        kept: structured only: per producer, the kept channels as indices into the full width.
        groups: structured only: the pruned groups (:mod:`~kiln.compress.prune.structured`).

    Raises:
        ValueError: ``initial`` lacks a tensor of the model or has another shape.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> start = {k: v.clone() for k, v in net.state_dict().items()}
        >>> _ = prune_unstructured(net, 0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight_orig.add_(1.0)
        >>> _ = rewind_(net, start)
        >>> torch.equal(net.weight_orig, start["weight"])
        True
    """
    target = st.slice_state(initial, kept, groups or []) if kept else dict(initial)
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in own.items():
            if key.endswith("_mask"):
                continue
            base = key.removesuffix("_orig")
            src = base if key.endswith("_orig") and f"{base}_mask" in own else key
            if src not in target or target[src].shape != tensor.shape:
                got = tuple(target[src].shape) if src in target else "missing"
                raise ValueError(
                    f"cannot rewind {key}: the initial weights have {src} = {got}, the model "
                    f"{tuple(tensor.shape)}; pass the initial state of this same architecture"
                )
            tensor.copy_(target[src])
    return model


def prune_model(
    model: nn.Module,
    spec: PruneSpec,
    *,
    finetune: Finetune | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> CompressedModel:
    """Prune ``model`` in place in ``spec.cycles`` cycles, each optionally rewound and fine-tuned.

    Unstructured masks are made permanent at the end, so the returned module has plain weights.

    Args:
        model: the trained model (plain, no masks).
        spec: amount, structured or not, method, scope, cycles.
        finetune: ``finetune(model, cycle) -> metrics``, called after each pruning step.
        initial: lottery-ticket rewind: the unpruned model's initial state dict.
        metadata: strings stored in the saved safetensors file (``prune_run.kiln_metadata``).

    Returns:
        A :class:`~kiln.compress.report.CompressedModel` (``method`` ``prune`` or
        ``prune-structured``) whose notes hold the sparsity, widths and per-cycle history.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> out = prune_model(net, PruneSpec(0.5, cycles=2))
        >>> out.notes["sparsity"]["total"]["sparsity"], [c["target"] for c in out.notes["cycles"]]
        (0.5, [0.2929, 0.5])
    """
    if any(k.endswith("_mask") for k, _ in model.named_buffers()):
        raise ValueError("the model already carries pruning masks; make_permanent() them first")
    if initial is not None and finetune is None:
        raise ValueError(
            "rewinding resets the survivors to their initial values; without fine-tuning the "
            "model would be untrained: give fine-tuning epochs (>= 1) or drop --rewind"
        )
    params_before = st.param_count(model)
    groups: list[st.Group] = []
    original: dict[str, int] = {}
    kept: dict[str, torch.Tensor] = {}
    widths_before = st.widths(model)
    if spec.structured:
        groups = st.find_groups(model)
        modules = dict(model.named_modules())
        original = {g.producer: st._out_width(modules[g.producer]) for g in groups}
    generator = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, Any]] = []
    for cycle, target in enumerate(sparsity_schedule(spec.amount, spec.cycles), 1):
        entry: dict[str, Any] = {"cycle": cycle, "target": round(target, 4)}
        if spec.structured:
            res = st.prune_structured(
                model, target, norm=spec.method, original=original, generator=generator
            )
            for name, idx in res.kept.items():
                kept[name] = kept.get(name, torch.arange(original[name]))[idx]
            entry["widths"] = dict(res.after)
        else:
            prune_unstructured(
                model, target, method=spec.method, scope=spec.scope, seed=spec.seed + cycle
            )
            entry["sparsity"] = sparsity(model)["total"]["sparsity"]
        if initial is not None:
            rewind_(model, initial, kept=kept if spec.structured else None, groups=groups)
        if finetune is not None:
            entry["finetune"] = finetune(model, cycle)
        history.append(entry)
    make_permanent(model)
    model.eval()
    notes: dict[str, Any] = {
        "structured": spec.structured,
        "amount": spec.amount,
        "method": spec.method,
        "scope": spec.scope,
        "cycles": history,
        "schedule": "geometric: cycle i of n prunes to 1 - (1 - amount) ** (i / n)",
        "rewind": initial is not None,
        "params": {"before": params_before, "after": st.param_count(model)},
        "sparsity": sparsity(model),
    }
    if spec.structured:
        notes["kept"] = {name: idx.tolist() for name, idx in kept.items()}
        after = st.widths(model)
        notes["widths"] = {
            name: {"before": widths_before[name], "after": size}
            for name, size in after.items()
            if size != widths_before[name]
        }

    def save(folder: Path) -> Path:
        path = save_pruned(model, folder, notes=notes, metadata=metadata)
        compressed.files = [path]
        return path

    compressed = CompressedModel(
        method="prune-structured" if spec.structured else "prune",
        predict=model,
        save=save,
        module=model,
        notes=notes,
    )
    return compressed

"""Exponential moving average (EMA) of a model's weights.

Averaging the weights along the optimisation trajectory removes much of the step-to-step noise
of SGD-like optimisers, so the averaged model usually evaluates better than the raw one (Polyak
averaging; used by EfficientNet, timm, diffusion models). :class:`EMA` is a small object usable in
any loop: call :meth:`EMA.update` after each optimizer step and swap the averaged weights in for
evaluation with :meth:`EMA.swapped`. Nothing here knows about the trainer.

Only plain tensors are supported: parameters that are DTensors (FSDP2 / tensor parallel) are not.
DDP- and ``torch.compile``-wrapped models are unwrapped, so the names stay those of the user's
module (no ``module.`` / ``_orig_mod.`` prefixes) and a checkpoint loads on either form.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> ema = EMA(model, decay=0.99)
    >>> for _ in range(3):
    ...     model(torch.randn(4, 2)).pow(2).mean().backward()
    ...     opt.step()
    ...     opt.zero_grad(set_to_none=True)
    ...     ema.update(model)
    >>> with ema.swapped(model):
    ...     _ = model(torch.randn(4, 2))  # evaluated with the averaged weights
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kiln.models.wrappers import unwrap_model

__all__ = ["EMA", "ema_decay"]

_STATE_KEYS = frozenset({"shadow", "decay", "num_updates"})


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay to use for the next update, after ``num_updates`` updates so far.

    With warmup the decay is ``min(decay, (1 + n) / (10 + n))``: the convention of TensorFlow's
    ``tf.train.ExponentialMovingAverage(num_updates=...)`` (used by the TF EfficientNet / MnasNet
    references that timm reproduces; timm's ``ModelEmaV3(use_warmup=True)`` ramps up the same way
    with a power law, ``1 - (1 + n / gamma) ** -power``). Early on the average follows the weights
    quickly (0.1 at ``n=0``, 0.55 at ``n=10``), so the random initialisation is forgotten instead
    of weighing ``decay**n`` for thousands of steps.

    Args:
        decay: The target decay, in (0, 1).
        num_updates: How many updates were applied before this one.
        warmup: Whether to apply the warmup ramp.

    Returns:
        The effective decay.

    Example:
        >>> ema_decay(0.999, 0)
        0.1
        >>> ema_decay(0.999, 10**6)
        0.999
    """
    _check_decay(decay)
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


def _check_decay(decay: float) -> None:
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 < decay < 1.0:
        raise ValueError(
            f"EMA decay must be a float in the open interval (0, 1), got {decay!r}; "
            "typical values are 0.99-0.9999 (closer to 1 averages over more steps)."
        )


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The shadow tensors are detached copies on the model's device. Floating-point tensors are
    averaged: ``shadow = d * shadow + (1 - d) * weight`` with ``d = ema_decay(decay, n, warmup)``
    (see :func:`ema_decay`); integer buffers (BatchNorm's ``num_batches_tracked``) are copied.
    Each update is a couple of ``torch._foreach_*`` calls over all tensors at once.

    Args:
        model: The model to average (DDP / compiled wrappers are unwrapped).
        decay: Target decay in (0, 1).
        warmup: Ramp the decay up as ``(1 + n) / (10 + n)`` (TensorFlow convention).
        update_buffers: Also track buffers (BatchNorm running statistics). When False only the
            parameters are averaged and :meth:`copy_to` leaves the model's buffers alone.

    Raises:
        ValueError: If ``decay`` is not in (0, 1).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        >>> ema = EMA(model, decay=0.999)
        >>> ema.update(model)          # after optimizer.step()
        >>> ema.num_updates
        1
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.999,
        warmup: bool = True,
        update_buffers: bool = True,
    ) -> None:
        _check_decay(decay)
        self.decay = float(decay)
        self.warmup = warmup
        self.update_buffers = update_buffers
        self.num_updates = 0
        tensors = self._named_tensors(model)
        # Names are fixed once here; the hot path only looks tensors up by these names.
        self._float_names = [n for n, t in tensors.items() if t.is_floating_point()]
        self._other_names = [n for n, t in tensors.items() if not t.is_floating_point()]
        with torch.no_grad():
            self._shadow: dict[str, Tensor] = {n: t.detach().clone() for n, t in tensors.items()}
        self._stored: list[Tensor] | None = None

    # ---- the hot path -------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after ``optimizer.step()``).

        Args:
            model: The model being trained (same architecture as at construction).

        Example:
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> ema = EMA(m)
            >>> ema.update(m)
        """
        floats, others = self._model_lists(model)
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        shadow_floats = [self._shadow[n] for n in self._float_names]
        if shadow_floats:
            # lerp_(s, w, 1 - d) == d * s + (1 - d) * w, one fused kernel per tensor group.
            torch._foreach_lerp_(shadow_floats, floats, 1.0 - d)
        if others:
            torch._foreach_copy_([self._shadow[n] for n in self._other_names], others)
        self.num_updates += 1

    # ---- using the averaged weights -----------------------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked tensors with the averaged ones.

        Args:
            model: A model with the same parameter (and buffer) names and shapes.

        Example:
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> EMA(m).copy_to(m)
        """
        floats, others = self._model_lists(model)
        targets = floats + others
        if targets:
            torch._foreach_copy_(targets, self._shadow_list())

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Save a copy of the model's current weights, to be put back by :meth:`restore`.

        Args:
            model: The model whose weights to keep.

        Example:
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> ema = EMA(m)
            >>> ema.store(m); ema.copy_to(m); ema.restore(m)
        """
        floats, others = self._model_lists(model)
        self._stored = [t.detach().clone() for t in floats + others]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by :meth:`store` (and forget them).

        Args:
            model: The model passed to :meth:`store`.

        Raises:
            RuntimeError: If :meth:`store` was not called first.

        Example:
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> ema = EMA(m)
            >>> ema.store(m); ema.restore(m)
        """
        if self._stored is None:
            raise RuntimeError(
                "EMA.restore() called without a stored copy; call ema.store(model) before "
                "ema.copy_to(model), or use `with ema.swapped(model):`."
            )
        floats, others = self._model_lists(model)
        targets = floats + others
        if targets:
            torch._foreach_copy_(targets, self._stored)
        self._stored = None

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights; the raw weights come back on exit, even on error.

        Args:
            model: The model being trained.

        Yields:
            The same model, holding the averaged weights inside the block.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> ema = EMA(m)
            >>> with ema.swapped(m), torch.inference_mode():
            ...     _ = m(torch.ones(1, 2))
        """
        self.store(model)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(model)

    @property
    def shadow(self) -> Mapping[str, Tensor]:
        """The averaged tensors by (unwrapped) name; read them, do not modify them."""
        return self._shadow

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors, decay and update count; loadable with ``torch.load(weights_only=True)``.

        Like ``nn.Module.state_dict`` the tensors are the live shadow tensors, not copies: save
        them (or clone them) before the next :meth:`update` if you need a snapshot.

        Example:
            >>> from torch import nn
            >>> sorted(EMA(nn.Linear(2, 2)).state_dict())
            ['decay', 'num_updates', 'shadow']
        """
        return {
            "shadow": dict(self._shadow),
            "decay": self.decay,
            "num_updates": self.num_updates,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the tensors are copied onto the shadow's device).

        Args:
            state: A dict produced by :meth:`state_dict`.

        Raises:
            ValueError: If keys, tensor names or shapes do not match this EMA's model, or the
                decay / update count are invalid.

        Example:
            >>> from torch import nn
            >>> m = nn.Linear(2, 2)
            >>> ema = EMA(m)
            >>> ema.load_state_dict(EMA(m).state_dict())
        """
        if set(state) != _STATE_KEYS:
            raise ValueError(
                f"EMA state must have exactly the keys {sorted(_STATE_KEYS)}, got {sorted(state)}; "
                "pass the dict produced by EMA.state_dict()."
            )
        shadow = state["shadow"]
        missing = sorted(set(self._shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self._shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing}, unexpected {unexpected}. "
                "Build the EMA from the same architecture (and the same update_buffers setting) "
                "as the checkpoint."
            )
        bad = [
            f"{n}: checkpoint {tuple(shadow[n].shape)} vs model {tuple(t.shape)}"
            for n, t in self._shadow.items()
            if shadow[n].shape != t.shape
        ]
        if bad:
            raise ValueError("EMA state has tensors of the wrong shape: " + "; ".join(bad))
        decay, num_updates = state["decay"], state["num_updates"]
        _check_decay(decay)
        if not isinstance(num_updates, int) or isinstance(num_updates, bool) or num_updates < 0:
            raise ValueError(f"EMA num_updates must be an int >= 0, got {num_updates!r}.")
        for n, t in self._shadow.items():
            t.copy_(shadow[n])
        self.decay = float(decay)
        self.num_updates = num_updates

    # ---- helpers ------------------------------------------------------------------------------

    def _named_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        model = unwrap_model(model)
        tensors: dict[str, Tensor] = dict(model.named_parameters())
        if self.update_buffers:
            tensors.update(model.named_buffers())
        return tensors

    def _model_lists(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The model's float and other tensors, in the shadow's order."""
        tensors = self._named_tensors(model)
        try:
            floats = [tensors[n] for n in self._float_names]
            others = [tensors[n] for n in self._other_names]
        except KeyError as err:
            raise RuntimeError(
                f"model has no tensor named {err.args[0]!r} that this EMA tracks; pass the model "
                "the EMA was built from (or one of the same architecture)."
            ) from None
        return floats, others

    def _shadow_list(self) -> list[Tensor]:
        return [self._shadow[n] for n in self._float_names + self._other_names]

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._shadow.values())
        return (
            f"EMA(decay={self.decay}, warmup={self.warmup}, update_buffers={self.update_buffers}, "
            f"num_updates={self.num_updates}, tensors={len(self._shadow)}, numel={numel})"
        )

"""Weight initialisation schemes applied per layer type, and zero-init of residual branches.

Why: a model's own ``__init__`` picks one initialisation; comparing schemes, or giving a
user's model the scheme its activation needs, should not mean editing the model. This module
re-initialises a built model in place, with one rule per layer type:

=====================  ====================================================================
Layer                  What a scheme other than ``default`` does
=====================  ====================================================================
Linear, Conv1d/2d/3d,  weight by the scheme (below), bias 0
ConvTranspose1d/2d/3d
Embedding              ``normal``: N(0, std) (the padding row, if any, 0); other schemes
                       leave it as built (fan-based formulas do not describe a lookup table)
BatchNorm, LayerNorm,  weight 1, bias 0 (running statistics are buffers and stay as they are)
GroupNorm, RMSNorm,
InstanceNorm
anything else with     left as built and reported as ``"skipped:<Type>"`` (e.g. a custom
its own parameters     module's ``nn.Parameter``, ``MultiheadAttention.in_proj_weight``, RNNs)
=====================  ====================================================================

Schemes, with ``gain = torch.nn.init.calculate_gain(nonlinearity)`` and the fans of the weight
(``fan_in = in_features * kernel elements``):

* ``kaiming_normal`` / ``kaiming_uniform``: std ``gain / sqrt(fan)`` (He et al., 2015);
  ``fan`` is ``fan_in`` (default) or ``fan_out`` (``mode``).
* ``xavier_normal`` / ``xavier_uniform``: std ``gain * sqrt(2 / (fan_in + fan_out))``
  (Glorot & Bengio, 2010). With the default ``nonlinearity="relu"`` the gain is ``sqrt(2)``;
  pass ``nonlinearity="linear"`` for the textbook gain-1 variant.
* ``orthogonal``: the weight, flattened to ``(out, in * kernel)``, has orthonormal rows (or
  columns, whichever are fewer) times ``gain`` (Saxe et al., 2014).
* ``normal``: N(0, ``std``) (GPT-2 and BERT use 0.02).
* ``zeros``: weights 0. Every unit then computes the same function, so the network cannot
  break the symmetry; meant for linear probes and debugging, not for training a deep net.
* ``default``: nothing; the model keeps the initialisation its constructor gave it.

Parameters shared by several modules (a language model's tied embedding and output head) are
initialised once, by the first module that owns them in ``model.modules()`` order; if that
module is left as built, the shared tensor is too.

Zero-init of residual branches (``zero_init_last=True``, Goyal et al., 2017): a residual block
``y = x + branch(x)`` whose branch ends in a zero-scaled norm (or a zero linear layer) starts as
the identity, so a deep network starts as a shallow one and trains stably at higher learning
rates. Which layer is "last" is a fact about the block, so the block says it: any module with a
``zero_init_last()`` method (the :class:`ResidualBranch` protocol; Kiln's ResNet
``BasicBlock`` has one) is asked to zero itself, after the scheme is applied. Kiln's GPT
``TransformerBlock`` is handled here: both of its branches end in a linear projection
(``attn.proj``, ``mlp.proj``) whose weight is zeroed. A model with no such block is an error,
so ``zero_init_last=True`` never silently does nothing.

Apply it after building the model and before wrapping it (DDP, ``torch.compile``) or creating
the optimizer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(256, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 2))
    >>> init_weights(net, "kaiming_normal")
    {'Linear': 2, 'LayerNorm': 1}
    >>> round(net[0].weight.std().item(), 2)  # sqrt(2) / sqrt(256)
    0.09
    >>> net[0].bias.abs().max().item()
    0.0
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, cast, get_args, runtime_checkable

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from kiln.config import did_you_mean
from kiln.config.schema import InitScheme
from kiln.models.gpt import TransformerBlock

__all__ = [
    "NONLINEARITIES",
    "SCHEMES",
    "Mode",
    "Nonlinearity",
    "ResidualBranch",
    "Scheme",
    "init_weights",
    "zero_init_residual_branches",
]

Scheme = InitScheme  # the names model.init accepts: one list, in kiln.config.schema
#: Every scheme :func:`init_weights` accepts (the same list as ``model.init`` in the config).
SCHEMES: tuple[str, ...] = get_args(Scheme)

Nonlinearity = Literal["relu", "leaky_relu", "tanh", "sigmoid", "selu", "linear"]
#: Activations whose gain ``torch.nn.init.calculate_gain`` knows. ``leaky_relu`` means a
#: negative slope of 0.01 (``nn.LeakyReLU``'s default).
NONLINEARITIES: tuple[str, ...] = get_args(Nonlinearity)
Mode = Literal["fan_in", "fan_out"]
_LEAKY_SLOPE = 0.01

_WEIGHTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@runtime_checkable
class ResidualBranch(Protocol):
    """A block that knows how to make its residual branch start at zero.

    ``zero_init_last()`` zeroes the last norm's weight of the branch (or the last Linear/Conv
    weight when the branch has no norm), so ``x + branch(x)`` starts as ``x``. Write it on a
    residual block of your own model to make ``init_weights(..., zero_init_last=True)`` (and
    ``model.zero_init_last=true`` in a config) apply to it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.branch = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x + self.branch(x)
        ...     def zero_init_last(self) -> None:
        ...         nn.init.zeros_(self.branch[-1].weight)
        >>> isinstance(Block(), ResidualBranch)
        True
    """

    def zero_init_last(self) -> None:
        """Zero the weight of the branch's last norm (or last Linear/Conv)."""


def _check_args(model: nn.Module, scheme: str, std: float, nonlinearity: str, mode: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_weights needs an nn.Module, got {type(model).__name__!r}")
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown init scheme {scheme!r}; {did_you_mean(scheme, SCHEMES)}"
            f"allowed: {', '.join(SCHEMES)}"
        )
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
        raise ValueError(f"init std must be a positive finite number (e.g. 0.02), got {std!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"unknown nonlinearity {nonlinearity!r}; {did_you_mean(nonlinearity, NONLINEARITIES)}"
            f"allowed: {', '.join(NONLINEARITIES)}. "
            "For GELU/SiLU networks 'relu' is the usual approximation"
        )
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def _init_weight(
    w: torch.Tensor, scheme: str, std: float, nonlinearity: Nonlinearity, mode: Mode
) -> None:
    """Apply ``scheme`` to one Linear/Conv weight in place."""
    gain = nn.init.calculate_gain(nonlinearity, _LEAKY_SLOPE)
    # For kaiming, torch's `a` is the leaky slope; it must agree with the gain used elsewhere.
    a = _LEAKY_SLOPE if nonlinearity == "leaky_relu" else 0.0
    if scheme == "kaiming_normal":
        nn.init.kaiming_normal_(w, a=a, mode=mode, nonlinearity=nonlinearity)
    elif scheme == "kaiming_uniform":
        nn.init.kaiming_uniform_(w, a=a, mode=mode, nonlinearity=nonlinearity)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(w, gain=gain)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(w, gain=gain)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w, gain=gain)
    elif scheme == "normal":
        nn.init.normal_(w, mean=0.0, std=std)
    else:
        assert scheme == "zeros", scheme
        nn.init.zeros_(w)


def _own(module: nn.Module, name: str, fresh: set[int]) -> torch.Tensor | None:
    """``module.<name>`` when it is a parameter this call has not initialised through an
    earlier owner, else None."""
    p = module._parameters.get(name)
    return p if p is not None and id(p) in fresh else None


def _init_module(
    m: nn.Module, fresh: set[int], scheme: str, std: float, nonlinearity: Nonlinearity, mode: Mode
) -> bool:
    """Initialise ``m``'s own parameters in ``fresh``; True when ``m``'s type has a rule."""
    weight, bias = _own(m, "weight", fresh), _own(m, "bias", fresh)
    if isinstance(m, _WEIGHTED):
        if weight is not None:
            _init_weight(weight, scheme, std, nonlinearity, mode)
        if bias is not None:
            nn.init.zeros_(bias)
    elif isinstance(m, _NORMS):
        if weight is not None:
            nn.init.ones_(weight)
        if bias is not None:
            nn.init.zeros_(bias)
    elif isinstance(m, nn.Embedding):
        if scheme != "normal":
            return False
        if weight is not None:
            nn.init.normal_(weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    weight[m.padding_idx].zero_()
    else:
        return False
    return True


def _zero_transformer_block(block: nn.Module) -> None:
    # Both branches of a pre-LN block end in a projection; zero weight (+ zero bias) -> x + 0.
    for name in ("attn.proj", "mlp.proj"):
        proj = block.get_submodule(name)
        assert isinstance(proj, nn.Linear)  # for the type checker
        nn.init.zeros_(proj.weight)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


def _has_hook(m: nn.Module) -> bool:
    # A Protocol isinstance check only sees that the attribute exists; a flag named
    # `zero_init_last` on a user's module must not be mistaken for the method.
    return callable(getattr(m, "zero_init_last", None))


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _has_hook(m) or isinstance(m, TransformerBlock)]


def _no_blocks_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"zero_init_last=True, but {type(model).__name__} has no residual block that says "
        "which layer ends its branch. Give your residual block a zero_init_last() method that "
        "zeroes the weight of the branch's last norm (or last Linear/Conv if it has no norm), "
        "or set zero_init_last=False (model.zero_init_last=false) for a non-residual model"
    )


def _zero_blocks(blocks: list[nn.Module]) -> int:
    for block in blocks:
        if _has_hook(block):
            block.zero_init_last()  # type: ignore[operator]
        else:
            assert isinstance(block, TransformerBlock)
            _zero_transformer_block(block)
    return len(blocks)


def zero_init_residual_branches(model: nn.Module) -> int:
    """Make every residual block of ``model`` start as its shortcut; return how many.

    Calls ``zero_init_last()`` on each module that has it (:class:`ResidualBranch`), and zeroes
    the two output projections of each Kiln GPT ``TransformerBlock``.

    Args:
        model: the network, already built.

    Returns:
        The number of blocks zeroed.

    Raises:
        ValueError: ``model`` has no residual block that says how to zero its branch.

    Example:
        >>> import torch
        >>> from kiln.models import ResNet
        >>> net = ResNet(num_classes=2, in_channels=1, depths=(1, 1), width=4)
        >>> zero_init_residual_branches(net)
        2
        >>> net.stages[0][0].branch.bn2.weight.abs().sum().item()
        0.0
    """
    blocks = _residual_blocks(model)
    if not blocks:
        raise _no_blocks_error(model)
    return _zero_blocks(blocks)


def init_weights(
    model: nn.Module,
    scheme: str,
    *,
    std: float = 0.02,
    zero_init_last: bool = False,
    nonlinearity: str = "relu",
    mode: Mode = "fan_in",
) -> dict[str, int]:
    """Re-initialise ``model``'s weights in place with ``scheme``, layer type by layer type.

    See the module docstring for the rule of each layer type and the formula of each scheme.
    Biases of Linear/Conv layers become 0; norm layers get weight 1 and bias 0; ``default``
    changes nothing. With ``zero_init_last`` each residual branch then gets its last norm (or
    last Linear/Conv) weight zeroed (:func:`zero_init_residual_branches`).

    Args:
        model: the network, already built (run one forward pass first if it has lazy layers).
        scheme: one of :data:`SCHEMES`.
        std: standard deviation of ``normal`` (weights and embeddings); ignored by the others.
        zero_init_last: zero the end of every residual branch so each block starts as the
            identity (its shortcut).
        nonlinearity: the activation after the layers; sets the gain of the kaiming, xavier and
            orthogonal schemes. One of :data:`NONLINEARITIES`.
        mode: ``fan_in`` (preserves the forward signal's variance) or ``fan_out`` (the
            backward gradient's) for the kaiming schemes.

    Returns:
        What was done: layer type name -> number of modules of that type initialised, plus
        ``"zero_init_last"`` -> blocks zeroed (when asked) and ``"skipped:<Type>"`` -> modules
        with parameters of their own that no rule covers (left as built). Empty when nothing
        changed.

    Raises:
        ValueError: an unknown scheme, nonlinearity or mode, a non-positive ``std``,
            uninitialised (lazy) parameters, or ``zero_init_last`` on a model without residual
            blocks; the message lists the allowed values. Nothing is changed then.
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from kiln.models import GPT
        >>> gpt = GPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
        >>> init_weights(gpt, "normal", std=0.02, zero_init_last=True)
        {'Embedding': 2, 'LayerNorm': 5, 'Linear': 8, 'zero_init_last': 2}
        >>> x = torch.randn(1, 3, 16)
        >>> torch.equal(gpt.blocks[0](x), x)  # every block starts as the identity
        True
    """
    _check_args(model, scheme, std, nonlinearity, mode)
    if scheme == "default" and not zero_init_last:
        return {}  # the model as built, whatever it holds (lazy layers included)
    nl = cast(Nonlinearity, nonlinearity)  # checked just above
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError(
            "the model has lazy layers whose parameters are not created yet; run one forward "
            "pass with a real batch (model(x)) before init_weights"
        )
    # Find the residual blocks before touching anything, so a refused call changes nothing.
    blocks = _residual_blocks(model) if zero_init_last else []
    if zero_init_last and not blocks:
        raise _no_blocks_error(model)
    report: dict[str, int] = {}
    if scheme != "default":
        seen: set[int] = set()
        for m in model.modules():
            own = [p for p in m._parameters.values() if p is not None]
            fresh = {id(p) for p in own if id(p) not in seen}
            seen.update(id(p) for p in own)
            if not fresh:
                continue  # no parameters, or only ones an earlier owner already handled
            if parametrize.is_parametrized(m):
                handled = False  # its "weight" is computed; writing to it would be lost
            else:
                handled = _init_module(m, fresh, scheme, std, nl, mode)
            key = type(m).__name__ if handled else f"skipped:{type(m).__name__}"
            report[key] = report.get(key, 0) + 1
    if zero_init_last:
        report["zero_init_last"] = _zero_blocks(blocks)
    return report

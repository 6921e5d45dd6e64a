"""A small decoder-only transformer (nanoGPT-style) for next-token prediction.

Why: the ``lm`` task needs a model where attention, weight tying, long-sequence memory and
sampling can be exercised on a CPU in seconds. The layout follows nanoGPT: learned token and
position embeddings, pre-LayerNorm blocks of causal self-attention
(``F.scaled_dot_product_attention(is_causal=True)``, which picks a fused kernel when it can) and
a 4x GELU MLP, a final LayerNorm, and an LM head that shares its weight with the token embedding.
Stochastic depth (``drop_path``) drops each block's two residual branches per sequence, with a
rate that grows linearly over the blocks (:func:`kiln.models.layers.drop_path_rates`).

Note for checkpoint code: because of the tying, ``lm_head.weight`` and ``tok_emb.weight`` are
the same tensor and both appear in ``state_dict()``.

Example:
    >>> import torch
    >>> gpt = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)
    >>> gpt(torch.randint(0, 50, (2, 16))).shape
    torch.Size([2, 16, 50])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.layers import DropPath, drop_path_rates

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = ["GPT", "CausalSelfAttention", "TransformerBlock", "build_gpt"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees only positions ``<= t``.

    Args:
        n_embd: model width; split evenly across heads.
        n_head: number of heads.
        dropout: attention-weight and output dropout (training mode only).
        bias: use biases in the linear layers.

    Example:
        >>> import torch
        >>> attn = CausalSelfAttention(n_embd=16, n_head=4)
        >>> attn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(
                f"n_embd ({n_embd}) must be divisible by n_head ({n_head}); e.g. n_embd=128, "
                "n_head=4"
            )
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors, the layout SDPA expects.
        q, k, v = (
            z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (4x width, GELU).

    With ``drop_path > 0`` each residual branch is dropped per sequence in training, with its
    own draw: ``x + drop_path1(attn(ln1(x)))``, then ``x + drop_path2(mlp(ln2(x)))``. The
    DropPath modules have no parameters, so the state_dict keys do not depend on them.

    Args:
        n_embd: model width.
        n_head: attention heads.
        dropout: dropout on both residual branches.
        bias: biases in linear layers and LayerNorms.
        drop_path: stochastic-depth rate of both residual branches, in ``[0, 1)``.

    Example:
        >>> import torch
        >>> TransformerBlock(16, 2)(torch.randn(1, 3, 16)).shape
        torch.Size([1, 3, 16])
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(n_embd, 4 * n_embd, bias=bias))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(4 * n_embd, n_embd, bias=bias))
        self.mlp.add_module("drop", nn.Dropout(dropout))
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        x = x + self.drop_path1(self.attn(self.ln1(x)))
        return x + self.drop_path2(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer: ``idx (B, T) -> logits (B, T, vocab_size)``.

    Weights start at normal(0, 0.02) with zero biases; the two residual output projections of
    each block (``attn.proj``, ``mlp.proj``) are scaled by ``1/sqrt(2 * n_layer)`` so the
    residual stream's variance does not grow with depth (GPT-2).

    Args:
        vocab_size: number of token ids.
        block_size: longest sequence the position embedding covers.
        n_layer: transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        dropout: dropout on embeddings, attention and residual branches.
        bias: biases in linear layers and LayerNorms.
        drop_path: stochastic-depth rate of the last block, in ``[0, 1)``; block ``i`` of
            ``n_layer`` uses ``drop_path * i / (n_layer - 1)``, so the first block is never
            dropped (nor a single-block model). 0 disables it.

    Example:
        >>> import torch
        >>> gpt = GPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
        >>> gpt.lm_head.weight is gpt.tok_emb.weight
        True
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            if value < 1:
                raise ValueError(f"GPT {name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(n_embd, n_head, dropout, bias, drop_path=rate)
            for rate in drop_path_rates(drop_path, n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one (vocab, n_embd) matrix
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for the next token at every position.

        Args:
            idx: token ids, ``(B, T)`` int64, ``T <= block_size``.

        Returns:
            ``(B, T, vocab_size)`` logits.

        Raises:
            ValueError: ``idx`` is not 2-D or ``T > block_size``.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (B, T), got {tuple(idx.shape)}")
        t = idx.size(1)
        if t > self.block_size:
            raise ValueError(
                f"sequence length {t} exceeds block_size {self.block_size}; crop the input to "
                f"the last {self.block_size} tokens or build the model with a larger block_size"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx``, one at a time.

        The context is cropped to the last ``block_size`` tokens. Call ``model.eval()`` first
        when the model has dropout.

        Args:
            idx: prompt token ids ``(B, T)``.
            max_new_tokens: tokens to append.
            temperature: divides the logits; 0 means greedy (argmax).
            top_k: sample only among the ``top_k`` most likely tokens (None: all).
            generator: RNG for reproducible sampling, on the model's device.

        Returns:
            ``(B, T + max_new_tokens)`` token ids: the prompt followed by the samples.

        Example:
            >>> import torch
            >>> gpt = GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8).eval()
            >>> g = torch.Generator().manual_seed(0)
            >>> gpt.generate(torch.zeros(1, 1, dtype=torch.long), 6, generator=g).shape
            torch.Size([1, 7])
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def build_gpt(
    info: DataInfo,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = True,
    drop_path: float = 0.0,
) -> GPT:
    """A :class:`GPT` whose vocabulary and block size come from ``lm`` data.

    Args:
        info: the data's description; task ``lm`` with ``vocab_size`` and
            ``input_shape == (block_size,)``.
        n_layer: see :class:`GPT`.
        n_head: see :class:`GPT`.
        n_embd: see :class:`GPT`.
        dropout: see :class:`GPT`.
        bias: see :class:`GPT`.
        drop_path: see :class:`GPT`.

    Raises:
        ValueError: the task is not ``lm`` or the data lacks a vocabulary.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> gpt = build_gpt(DataInfo("lm", (32,), vocab_size=65), n_layer=1, n_embd=32)
        >>> gpt.block_size, gpt.vocab_size
        (32, 65)
    """
    if info.task != "lm":
        raise ValueError(
            f"model 'gpt' is a language model but the data's task is {info.task!r}; use "
            "data.name=text, or model.name=mlp / resnet for this data"
        )
    if info.vocab_size is None or len(info.input_shape) != 1:
        raise ValueError(
            "lm data must give vocab_size and input_shape=(block_size,) to size the GPT; got "
            f"vocab_size={info.vocab_size}, input_shape={info.input_shape}"
        )
    return GPT(
        vocab_size=info.vocab_size,
        block_size=info.input_shape[0],
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        bias=bias,
        drop_path=drop_path,
    )

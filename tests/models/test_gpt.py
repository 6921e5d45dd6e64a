"""GPT: shapes, causality, weight tying, init scale, length errors and sampling."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.data.base import DataInfo
from kiln.models import GPT, build_gpt

VOCAB, BLOCK = 11, 8


def tiny(**kwargs: object) -> GPT:
    torch.manual_seed(0)
    args: dict = {"n_layer": 2, "n_head": 2, "n_embd": 16, **kwargs}
    return GPT(vocab_size=VOCAB, block_size=BLOCK, **args).eval()


def test_builder_sizes_from_lm_data_and_output_shape() -> None:
    gpt = build_gpt(DataInfo("lm", (BLOCK,), vocab_size=VOCAB), n_layer=1, n_head=2, n_embd=16)
    assert (gpt.vocab_size, gpt.block_size) == (VOCAB, BLOCK)
    idx = torch.randint(0, VOCAB, (3, BLOCK))
    assert gpt(idx).shape == (3, BLOCK, VOCAB)
    assert gpt(idx[:, :5]).shape == (3, 5, VOCAB)  # shorter than block_size is fine


def test_builder_refuses_other_tasks() -> None:
    with pytest.raises(ValueError, match="language model"):
        build_gpt(DataInfo("classification", (BLOCK,), num_classes=3))
    with pytest.raises(ValueError, match="vocab_size"):
        build_gpt(DataInfo("lm", (BLOCK,)))
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT(VOCAB, BLOCK, n_head=3, n_embd=16)


@pytest.mark.parametrize("t", [0, 3, BLOCK - 2])
def test_causal_future_tokens_do_not_change_past_logits(t: int) -> None:
    gpt = tiny()
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % VOCAB
    a, b = gpt(idx), gpt(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change is visible later on


def test_lm_head_is_tied_to_token_embedding() -> None:
    gpt = tiny()
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert gpt.lm_head.weight.data_ptr() == gpt.tok_emb.weight.data_ptr()
    n_unique = sum(p.numel() for p in gpt.parameters())
    assert n_unique < sum(t.numel() for t in gpt.state_dict().values())  # counted once


def test_init_scales() -> None:
    torch.manual_seed(0)
    gpt = GPT(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=128)
    proj = gpt.blocks[0].mlp.proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert gpt.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(gpt.blocks[0].attn.qkv.bias) == 0


def test_too_long_input_is_refused() -> None:
    with pytest.raises(ValueError, match=f"sequence length {BLOCK + 1} exceeds block_size {BLOCK}"):
        tiny()(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        tiny()(torch.zeros(BLOCK, dtype=torch.long))


def test_generate_length_and_reproducibility() -> None:
    gpt = tiny()
    prompt = torch.randint(0, VOCAB, (2, 3))
    n = 2 * BLOCK  # longer than block_size: the context is cropped
    out1 = gpt.generate(prompt, n, generator=torch.Generator().manual_seed(0))
    out2 = gpt.generate(prompt, n, generator=torch.Generator().manual_seed(0))
    out3 = gpt.generate(prompt, n, generator=torch.Generator().manual_seed(1))
    assert out1.shape == (2, 3 + n)
    assert torch.equal(out1[:, :3], prompt)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    assert int(out1.min()) >= 0 and int(out1.max()) < VOCAB


def test_generate_top1_equals_greedy() -> None:
    gpt = tiny()
    prompt = torch.randint(0, VOCAB, (2, 2))
    greedy = gpt.generate(prompt, 5, temperature=0.0)
    top1 = gpt.generate(prompt, 5, temperature=0.7, top_k=1, generator=torch.Generator())
    assert torch.equal(greedy, top1)
    expected = gpt(prompt)[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 2], expected)
    with pytest.raises(ValueError, match="top_k"):
        gpt.generate(prompt, 1, top_k=0)


def test_trains_and_gradients_reach_tied_weight() -> None:
    gpt = tiny(n_layer=1).train()
    idx = torch.randint(0, VOCAB, (4, BLOCK), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(gpt.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = gpt(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert gpt.tok_emb.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

"""The MAP head's factorised single-query forward equals attention through nn.MultiheadAttention with its weights."""

from __future__ import annotations

import pytest
import torch

from nearid_reward.config import HeadConfig
from nearid_reward.head import MAPHead
from train_head.fast_head import FastMAPHead


def reference(head: MAPHead, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook forward: the probe attends over key/value projections of every token (torch's own MHA)."""
    probe = head.probe.expand(x.shape[0], -1, -1)
    padding = None if mask is None else ~mask
    pooled = head.attention(probe, x, x, key_padding_mask=padding, need_weights=False)[0][:, 0]
    out = pooled + head.mlp(head.layernorm(pooled))
    return out if head.proj is None else head.proj(out)


@pytest.mark.parametrize("out_dim", [None, 24])
def test_matches_multihead_attention_with_and_without_mask(out_dim):
    torch.manual_seed(0)
    head = MAPHead(HeadConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, out_dim=out_dim)).double()
    x = torch.randn(5, 12, 32, dtype=torch.float64)
    mask = torch.rand(5, 12) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(head(x), reference(head, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head(x, mask), reference(head, x, mask), rtol=1e-10, atol=1e-12)
    # masked tokens have no influence
    y = x.clone()
    y[~mask] = 1e3
    torch.testing.assert_close(head(y, mask), head(x, mask), rtol=1e-10, atol=1e-12)


def test_gradients_match_multihead_attention():
    torch.manual_seed(1)
    head = MAPHead(HeadConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    reference(head, x).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in head.named_parameters()}
    expected_x = x.grad.clone()
    head.zero_grad()
    x.grad = None
    FastMAPHead(head)(x).pow(2).sum().backward()
    for name, param in head.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-9, atol=1e-12)
    # the trainer's accelerate checkpoints keep the head.* names
    assert list(FastMAPHead(head).state_dict()) == [f"head.{k}" for k in head.state_dict()]


def test_bfloat16_head_stays_close_to_the_float32_reference():
    torch.manual_seed(2)
    head = MAPHead(HeadConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128))
    x = torch.randn(4, 50, 64)
    expected = torch.nn.functional.normalize(reference(head, x), dim=-1)
    got = torch.nn.functional.normalize(head.to(torch.bfloat16)(x).float(), dim=-1)
    assert (got * expected).sum(-1).min() > 0.999

"""The factorised single-query MAP head forward equals the head's own forward (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from train_head_fixtures import one_thread  # noqa: F401  (autouse: one torch thread)

from nearid_reward.config import HeadConfig
from nearid_reward.head import MAPHead
from train_head.fast_head import FastMAPHead


@pytest.mark.parametrize("out_dim", [None, 24])
def test_matches_the_head_forward_with_and_without_mask(out_dim):
    torch.manual_seed(0)
    head = MAPHead(HeadConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, out_dim=out_dim)).double()
    fast = FastMAPHead(head)
    x = torch.randn(5, 12, 32, dtype=torch.float64)
    mask = torch.rand(5, 12) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(fast(x), head(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast(x, mask), head(x, mask), rtol=1e-10, atol=1e-12)
    # masked tokens have no influence
    y = x.clone()
    y[~mask] = 1e3
    torch.testing.assert_close(fast(y, mask), fast(x, mask), rtol=1e-10, atol=1e-12)


def test_gradients_match_and_reach_the_wrapped_head():
    torch.manual_seed(1)
    head = MAPHead(HeadConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    head(x).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad()
    FastMAPHead(head)(x).pow(2).sum().backward()
    for name, param in head.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert list(FastMAPHead(head).state_dict()) == [f"head.{k}" for k in head.state_dict()]

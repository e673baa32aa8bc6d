"""The module the trainer hands to ``accelerator.prepare``: the NearID head under a stable parameter prefix.

The MAP head's forward is itself the factorised single-query attention (see :class:`~nearid_reward.head.MAPHead`),
so this wrapper adds no computation. It keeps the head's parameters under a stable ``head.*`` prefix in the prepared
(DDP-wrapped) module.
"""

from __future__ import annotations

import torch
from torch import nn

from nearid_reward.head import MAPHead

__all__ = ["FastMAPHead"]


class FastMAPHead(nn.Module):
    """Wraps a :class:`~nearid_reward.head.MAPHead`; training through it trains that head's own parameters.

    Args:
        head: the head whose parameters are used (and trained).

    Example:
        >>> from nearid_reward.config import HeadConfig
        >>> head = MAPHead(HeadConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64))
        >>> x = torch.randn(2, 16, 32)
        >>> torch.equal(FastMAPHead(head)(x), head(x))
        True
    """

    def __init__(self, head: MAPHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool tokens ``[B, N, D]`` (optional mask ``[B, N]``, True = real token) to ``[B, E]`` (not normalised)."""
        return self.head(tokens, token_mask)

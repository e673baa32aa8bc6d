"""The multi-head attention pooling (MAP) head that NearID retrains on top of a frozen SigLIP backbone."""

from __future__ import annotations

import torch
from torch import nn

from .config import HeadConfig

__all__ = ["MAPHead", "HEAD_PARAMETER_NAMES"]

# Parameter names shared with SigLIP's own pooling head (and the official release's ``head.*`` keys).
HEAD_PARAMETER_NAMES = (
    "probe",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "layernorm.weight",
    "layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


class _HeadMLP(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        from transformers.activations import ACT2FN  # lazily: this import pulls in accelerate when installed

        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MAPHead(nn.Module):
    """Attention pooling with a learned probe: tokens ``[B, N, D]`` -> one vector ``[B, E]`` per image.

    The structure (and parameter names) of SigLIP's ``MultiheadAttentionPoolingHead``: the probe attends over the
    tokens with ``nn.MultiheadAttention``; the result (no residual to the probe) goes through
    ``h + MLP(LayerNorm(h))``. An optional ``proj`` Linear maps to ``out_dim`` when configured.

    Args:
        config: the head's shape.

    Example:
        >>> head = MAPHead(HeadConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64))
        >>> head(torch.randn(2, 16, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = _HeadMLP(config)
        self.proj = nn.Linear(config.hidden_size, config.out_dim) if config.out_dim is not None else None

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool tokens.

        Args:
            tokens: ``[B, N, D]`` final (post-LayerNorm) backbone tokens; cast to the head's dtype.
            token_mask: optional ``[B, N]`` with 1/True for real tokens and 0/False for padding (NaFlex batches).

        Returns:
            ``[B, E]`` raw pooled features (not normalised), in the head's dtype.
        """
        dtype = self.probe.dtype
        tokens = tokens.to(dtype)
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        padding = None
        if token_mask is not None:
            padding = ~token_mask.to(torch.bool)  # True where the token must be ignored
            if not bool(padding.any()):
                padding = None
        pooled = self.attention(probe, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]  # [B, 1, D]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        out = pooled[:, 0]  # [B, D]
        if self.proj is not None:
            out = self.proj(out)  # [B, E]
        return out

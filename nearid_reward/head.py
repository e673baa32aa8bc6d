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
    tokens (the weights of an ``nn.MultiheadAttention``); the result (no residual to the probe) goes through
    ``h + MLP(LayerNorm(h))``. An optional ``proj`` Linear maps to ``out_dim`` when configured.

    The attention has a single query, so the forward computes it factorised, exactly (up to float rounding):

    * logits of head ``h``: ``q_h . (W_k,h x_n + b_k,h) = x_n . (W_k,h^T q_h) + q_h . b_k,h``; the second term is the
      same for every token and cancels in the softmax, so one ``D``-vector per head replaces the key projection;
    * output of head ``h``: ``sum_n a_hn (W_v,h x_n + b_v,h) = W_v,h (sum_n a_hn x_n) + b_v,h`` because the weights
      sum to 1, so the tokens are pooled first and projected once.

    That costs about ``N D H + D^2`` multiply-adds per image instead of the ``2 N D^2`` of projecting every token to
    keys and values (about 100x fewer for SigLIP's 729 x 1152 tokens), for inference, the reward's backward pass and
    head training alike.

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
        attn = self.attention
        dim, heads = self.config.hidden_size, self.config.num_attention_heads
        width = dim // heads
        x = tokens.to(self.probe.dtype)  # [B, N, D]
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # [D, D] each, rows grouped by attention head
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        q = (self.probe.reshape(dim) @ w_q.T + b_q).view(heads, width) * width**-0.5  # [H, d]
        u = torch.einsum("hc,hcd->hd", q, w_k.view(heads, width, dim))  # [H, D]
        logits = x @ u.T  # [B, N, H]
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask.to(torch.bool).unsqueeze(-1), float("-inf"))
        weights = logits.softmax(dim=1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)  # [B, N, H]
        pooled = torch.einsum("bnh,bnd->bhd", weights, x)  # [B, H, D]
        values = torch.einsum("bhd,hcd->bhc", pooled, w_v.view(heads, width, dim)) + b_v.view(heads, width)
        out = attn.out_proj(values.reshape(x.shape[0], dim))  # [B, D]
        out = out + self.mlp(self.layernorm(out))
        if self.proj is not None:
            out = self.proj(out)  # [B, E]
        return out

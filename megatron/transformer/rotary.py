"""Rotary position embeddings (RoPE), applied to queries and keys of shape [b, s, heads, head_dim]."""

import torch


def rope_tables(head_dim: int, max_len: int, base: float = 10000.0, device=None):
    """cos/sin tables of shape [max_len, head_dim // 2], computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by the position angles.

    x: [b, s, heads, d]; cos/sin: [s, d/2] (broadcast over batch and heads).
    """
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)

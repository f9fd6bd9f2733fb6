"""Rotary position embeddings (RoPE), applied to queries and keys of shape [b, s, heads, head_dim]."""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's frequency scaling (HF rope_scaling type "llama3"): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter
    than original_max_position_embeddings / high_freq_factor kept, those between interpolated."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __call__(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # HF's _compute_llama3_parameters, step for step, so converted models keep their numbers.
        old_context = self.original_max_position_embeddings
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


def rope_tables(head_dim: int, max_len: int, base: float = 10000.0, device=None,
                scaling: Llama3RopeScaling | None = None):
    """cos/sin tables of shape [max_len, head_dim // 2], computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaling(inv_freq)
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

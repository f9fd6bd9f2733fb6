"""A pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

import torch
from torch import nn

from megatron.transformer.attention import Attention
from megatron.transformer.config import ModelConfig
from megatron.transformer.mlp import MLP
from megatron.transformer.norm import build_norm


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number  # 1-based, Megatron's convention
        self.attention_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim,
                                   bias=cfg.add_bias_linear, dropout=cfg.attention_dropout,
                                   num_kv_heads=cfg.num_kv_heads, qkv_bias=cfg.add_qkv_bias)
        self.mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.swiglu, bias=cfg.add_bias_linear)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def attend(self, x: torch.Tensor, rope, causal: bool = True, attn_mask=None, kv_cache=None) -> torch.Tensor:
        """The self-attention sublayer; attn_mask and kv_cache are incremental decoding's
        (megatron/inference/decoder.py), whose later steps pass causal=False and their own mask."""
        attended = self.attention(self.attention_norm(x), rope_q=rope, rope_k=rope, causal=causal,
                                  attn_mask=attn_mask, kv_cache=kv_cache)
        return x + self.dropout(attended)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """x: [b, s, h]; rope: (cos, sin) for positions 0..s-1."""
        return self.feed_forward(self.attend(x, rope))

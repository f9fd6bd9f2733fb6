"""Multi-head and grouped-query self- and cross-attention on scaled_dot_product_attention.

Queries, keys, values and the output projection are separate linears (wq, wk, wv, wo) and
heads are recovered with a reshape to -1, so a tensor-parallel plan can shard them
column-/row-wise from outside without this file knowing. Under grouped-query attention each
key/value head serves num_heads / num_kv_heads consecutive query heads (HF Llama's layout); a
rank that owns a slice of both keeps whole groups, so the ratio is the same on every rank.
"""

import torch.nn.functional as F
from torch import nn

from megatron.transformer.rotary import apply_rotary


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = False,
                 dropout: float = 0.0, kv_dim: int | None = None, num_kv_heads: int | None = None,
                 qkv_bias: bool = False):
        """num_kv_heads: key/value heads (None: num_heads); qkv_bias: biases on wq/wk/wv even
        without `bias` (Qwen2)."""
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"--num-attention-heads {num_heads} is not divisible by "
                             f"--num-query-groups {num_kv_heads}")
        self.head_dim = head_dim
        self.dropout = dropout
        self.wq = nn.Linear(dim, num_heads * head_dim, bias=bias or qkv_bias)
        self.wk = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias or qkv_bias)
        self.wv = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias or qkv_bias)
        self.wo = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def project_kv(self, kv, rope_k=None):
        """Keys and values [b, t, heads, head_dim] of the source kv [b, t, kv_dim], keys rotated."""
        b, t, _ = kv.shape
        k = self.wk(kv).view(b, t, -1, self.head_dim)
        v = self.wv(kv).view(b, t, -1, self.head_dim)
        if rope_k is not None:
            k = apply_rotary(k, *rope_k)
        return k, v

    def forward(self, x, kv=None, rope_q=None, rope_k=None, causal=False, attn_mask=None, kv_cache=None,
                projected_kv=None):
        """x: [b, s, dim] queries; kv: [b, t, kv_dim] keys/values source (None: self-attention).

        rope_q / rope_k: (cos, sin) tables for query / key positions, or None for no RoPE.
        attn_mask: bool [b or 1, 1, s, t], True = may attend.
        Incremental decoding (megatron/inference):
        kv_cache: an object whose `update(k, v)` stores this call's rotated keys/values
        [b, t, heads, head_dim] and returns all cached so far;
        projected_kv: (k, v) from `project_kv`, computed once and reused (kv and rope_k unused).
        """
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        if rope_q is not None:
            q = apply_rotary(q, *rope_q)
        k, v = projected_kv if projected_kv is not None else self.project_kv(x if kv is None else kv, rope_k)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if k.shape[2] != q.shape[2]:  # grouped-query: the cache keeps one copy per key/value head
            k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, is_causal=causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

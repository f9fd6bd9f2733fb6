"""Chunked cross-attention (CCA, RETRO paper §2.4): decoder tokens attend to the encoded
neighbours of the chunk that precedes them, one attention call for all chunks of the batch.

Causality by construction: the hidden sequence is shifted left by m - 1 tokens and cut into
chunks of m, so shifted chunk u holds positions (u+1)m-1 .. (u+2)m-2, i.e. the last token of
chunk u up to the token before the last of chunk u+1. Those tokens attend to the neighbours of
chunk u, which were retrieved with (and encoded conditioned on) chunk u only, all of it at or
before the last token of chunk u. The first m - 1 positions attend to nothing and get zero.

A sequence that is not a multiple of m is padded at the end and cropped back. Masked neighbours
(id -1 in the work dir) are left out of the keys with a boolean mask; a chunk whose neighbours
are all masked would make the softmax 0/0, so its keys are unmasked for the call (finite values)
and its output is set to exactly zero afterwards.

Relative positions (RoPE), as in the paper: a query at shifted-chunk index i sits at position
m - 1 + i from the start of chunk u, a neighbour token at its index j in 0..r-1 inside its
neighbour (all k neighbours restart at 0), so scores depend on the offset between where the
query is in the chunk and where the key is in its neighbour (chunk + continuation).
"""

import torch
import torch.nn.functional as F

from megatron.transformer.attention import Attention
from megatron.transformer.rotary import rope_tables


class ChunkedCrossAttention(Attention):
    """wq/wk/wv/wo as in ``Attention`` (queries from the decoder width ``dim``, keys and values
    from the encoder width ``kv_dim``); only the chunking around the attention call is added."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, chunk_length: int, kv_dim: int,
                 bias: bool = False, dropout: float = 0.0, rotary_base: float = 10000.0):
        super().__init__(dim, num_heads, head_dim, bias=bias, dropout=dropout, kv_dim=kv_dim)
        self.chunk_length = chunk_length
        self.rotary_base = rotary_base

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor,
                neighbor_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, s, dim] (normalised decoder states); neighbors: [b, l, k, r, kv_dim] encoded,
        l = ceil(s / m); neighbor_mask: bool [b, l, k], True = real neighbour (None: all real).
        Returns [b, s, dim]."""
        b, s, _ = x.shape
        _, l, k, r, _ = neighbors.shape
        m = self.chunk_length
        # Shift left by m - 1 and pad to l whole chunks (l * m >= s - m + 1 always).
        shifted = x[:, m - 1:]
        shifted = F.pad(shifted, (0, 0, 0, l * m - shifted.shape[1]))
        out = self.attend(shifted.reshape(b * l, m, -1), neighbors.reshape(b * l, k, r, -1),
                          None if neighbor_mask is None else neighbor_mask.reshape(b * l, k))
        # Shift back: the first m - 1 positions receive zero, the padding is cropped.
        out = out.reshape(b, l * m, -1)
        return torch.cat((out.new_zeros(b, m - 1, out.shape[-1]), out), dim=1)[:, :s]

    def neighbor_keys_values(self, neighbors: torch.Tensor):
        """Keys (rotated) and values [B, k * r, heads, head_dim] of encoded neighbours [B, k, r, kv_dim]."""
        bl, k, r, _ = neighbors.shape
        cos, sin = rope_tables(self.head_dim, r, self.rotary_base, device=neighbors.device)
        return self.project_kv(neighbors.reshape(bl, k * r, -1), (cos.repeat(k, 1), sin.repeat(k, 1)))

    def attend(self, queries: torch.Tensor, neighbors, neighbor_mask: torch.Tensor | None = None,
               query_offset: int = 0) -> torch.Tensor:
        """The attention of shifted chunks to their own neighbours, one row per chunk.

        queries: [B, n, dim], positions query_offset .. query_offset + n - 1 of their shifted
        chunk (forward passes whole chunks; incremental decoding a few tokens); neighbors:
        [B, k, r, kv_dim] encoded, or their `neighbor_keys_values` (decoding computes them once
        per chunk); neighbor_mask: bool [B, k] or None. Returns [B, n, dim]."""
        keys_values = neighbors if isinstance(neighbors, tuple) else self.neighbor_keys_values(neighbors)
        bl, n, _ = queries.shape
        m = self.chunk_length
        cos, sin = rope_tables(self.head_dim, 2 * m - 1, self.rotary_base, device=queries.device)
        first = m - 1 + query_offset
        rope_q = (cos[first:first + n], sin[first:first + n])

        attn_mask = has_neighbor = None
        if neighbor_mask is not None:
            k = neighbor_mask.shape[1]
            r = keys_values[0].shape[1] // k
            has_neighbor = neighbor_mask.any(dim=-1)
            key_mask = neighbor_mask | ~has_neighbor[:, None]
            attn_mask = key_mask[:, :, None].expand(bl, k, r).reshape(bl, 1, 1, k * r)

        out = super().forward(queries, rope_q=rope_q, attn_mask=attn_mask, projected_kv=keys_values)
        if has_neighbor is not None:
            out = out.masked_fill(~has_neighbor[:, None, None], 0.0)
        return out

"""The retrieval encoder (RETRO paper §2.4, Listing 1): a small bidirectional transformer over each
retrieved neighbour, conditioned on the decoder states of the chunk the neighbour was retrieved for.

Input: the neighbours' tokens embedded with the decoder's own token embedding, [b, l, k, r, h]
(projected to the encoder width when it differs). Each encoder layer:
    x = x + self_attention(norm(x))      within each neighbour, no causal mask, RoPE 0..r-1
    x = x + cross_attention(norm(x), H_u) first layer only (or all): queries = neighbour tokens,
                                          keys/values = the m decoder states of chunk u, no RoPE
    x = x + mlp(norm(x))
and a final norm. Output: E [b, l, k, r, d_enc], used by every CCA of the decoder.

Embedding skip (RetroConfig.encoder_embedding_skip, on by default): E = norm(x_L) + skip_norm(x_0),
each token's own (projected) embedding added back at unit scale. The residual stream starts from
embeddings of std 0.02 while each sublayer adds several times that of other positions' content
(self-attention over the neighbour, cross-attention to the chunk), so without it E at position j
carried token j only faintly: the CCA soon attended to the right neighbour token, yet the copy it
read gained 0.155 of ~3 nats on leaked neighbours in 400 steps; with it 0.62 (docs/experiments.md).

Conditioning on H_u is causal-safe: E_u is only read by decoder positions from the last token
of chunk u onwards (see chunked_cross_attention.py), and H_u depends on no later token.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.transformer.attention import Attention
from megatron.transformer.config import ModelConfig
from megatron.transformer.mlp import MLP
from megatron.transformer.norm import build_norm
from megatron.transformer.rotary import rope_tables


class RetroEncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, decoder_hidden_size: int, cross_attention: bool):
        super().__init__()
        h = cfg.hidden_size
        self.attention_norm = build_norm(cfg.normalization, h, cfg.norm_epsilon)
        self.attention = Attention(h, cfg.num_attention_heads, cfg.head_dim,
                                   bias=cfg.add_bias_linear, dropout=cfg.attention_dropout)
        if cross_attention:
            self.cross_attention_norm = build_norm(cfg.normalization, h, cfg.norm_epsilon)
            self.cross_attention = Attention(h, cfg.num_attention_heads, cfg.head_dim, bias=cfg.add_bias_linear,
                                             dropout=cfg.attention_dropout, kv_dim=decoder_hidden_size)
        else:
            self.cross_attention_norm = self.cross_attention = None
        self.mlp_norm = build_norm(cfg.normalization, h, cfg.norm_epsilon)
        self.mlp = MLP(h, cfg.ffn_hidden_size, cfg.swiglu, bias=cfg.add_bias_linear)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, chunk_states: torch.Tensor, rope, retrieved_length: int) -> torch.Tensor:
        """x: [b*l, k*r, d] (the k neighbours of a chunk side by side); chunk_states: [b*l, m, h]."""
        per_neighbor = self.attention_norm(x).reshape(-1, retrieved_length, x.shape[-1])
        attended = self.attention(per_neighbor, rope_q=rope, rope_k=rope)
        x = x + self.dropout(attended.reshape(x.shape))
        if self.cross_attention is not None:
            # All k neighbours of chunk u query the same m states: one call per chunk, no mask.
            x = x + self.dropout(self.cross_attention(self.cross_attention_norm(x), kv=chunk_states))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class RetroEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, decoder_hidden_size: int, chunk_length: int,
                 cross_attention: str = "first", embedding_skip: bool = False):
        """cfg: the encoder's ModelConfig (RetroConfig.encoder_model_config);
        cross_attention: "first" or "all" encoder layers attend to the decoder chunk;
        embedding_skip: add the normalised input embeddings to the output (module docstring)."""
        super().__init__()
        self.cfg = cfg
        self.chunk_length = chunk_length
        self.input_proj = (nn.Linear(decoder_hidden_size, cfg.hidden_size, bias=False)
                           if cfg.hidden_size != decoder_hidden_size else None)
        self.layers = nn.ModuleDict({
            str(i): RetroEncoderLayer(cfg, decoder_hidden_size, cross_attention == "all" or i == 0)
            for i in range(cfg.num_layers)
        })
        self.norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.skip_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon) if embedding_skip else None

    def forward(self, neighbors: torch.Tensor, decoder_states: torch.Tensor) -> torch.Tensor:
        """neighbors: [b, l, k, r, h] embedded neighbour tokens; decoder_states: [b, s, h] the
        decoder's normalised states at this layer. Returns E: [b, l, k, r, d_enc].

        A partial last chunk is zero-padded here; its E is never read by CCA (no position of the
        sequence reaches that chunk's last token), so the padding changes no output."""
        b, l, k, r, _ = neighbors.shape
        m = self.chunk_length
        missing = l * m - decoder_states.shape[1]
        # Only a partial chunk is padded: F.pad by nothing still copies, forward and backward.
        chunk_states = F.pad(decoder_states, (0, 0, 0, missing)) if missing else decoder_states
        chunk_states = chunk_states.reshape(b * l, m, -1)
        x = neighbors if self.input_proj is None else self.input_proj(neighbors)
        x = embedded = x.reshape(b * l, k * r, -1)
        rope = rope_tables(self.cfg.head_dim, r, self.cfg.rotary_base, device=x.device)
        for layer in self.layers.values():
            x = layer(x, chunk_states, rope, r)
        out = self.norm(x)
        if self.skip_norm is not None:
            out = out + self.skip_norm(embedded)
        return out.reshape(b, l, k, r, -1)

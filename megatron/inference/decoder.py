"""Incremental decoding of a GPTModel or RetroModel: a KV cache for self-attention, and the
chunked cross-attention (CCA) state that RETRO needs between steps.

`IncrementalDecoder.step(tokens, neighbors)` runs the model's own modules on the next n tokens
only, and returns the same logits as a full forward over everything fed so far (test:
tests/unit/test_generation.py). What a step keeps:
- per decoder layer, the rotated keys and values of every position (so a token costs one
  position of attention, not a re-run of the window);
- at the layer holding the retrieval encoder, the cca_norm states of every position: chunk u's
  neighbours are encoded conditioned on the m states of chunk u;
- the encoded neighbours E_u of the chunks that positions still to come attend to, and each
  retro layer's CCA keys/values of them (projected once per chunk, not once per token);
- with gates (--retro-attention-gate), the token ids fed so far, and each chunk's overlap with
  its neighbours, from which every gated layer's per-chunk gate is computed as in the forward.

Causality (see models/retro/chunked_cross_attention.py): positions (u+1)m-1 .. (u+2)m-2 attend
to the neighbours of chunk u, so chunk u's neighbours must be handed to the step that feeds its
last token (position (u+1)m-1): they are retrieved with chunk u's tokens, all known by then.
A chunk whose neighbours are not given gets none (retrieval off for the positions reading it).
"""

import torch
from torch import nn

from megatron.models.retro.gate import neighbor_overlap
from megatron.models.retro.model import RetroBlock


class KVCache:
    """One layer's keys and values [b, max_length, heads, head_dim], allocated on first use."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys = self.values = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append this step's keys/values [b, n, heads, head_dim]; return all of them so far."""
        if self.keys is None:
            shape = (k.shape[0], self.max_length, *k.shape[2:])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        n = k.shape[1]
        self.keys[:, self.length:self.length + n] = k
        self.values[:, self.length:self.length + n] = v
        self.length += n
        return self.keys[:, :self.length], self.values[:, :self.length]


class IncrementalDecoder:
    def __init__(self, model: nn.Module, max_length: int | None = None):
        """model: a GPTModel or RetroModel in eval mode; max_length: positions to make room for
        (default and upper bound: the model's --max-position-embeddings)."""
        if model.training:
            raise ValueError("incremental decoding needs the model in eval mode (dropout off)")
        limit = model.rope_cos.shape[0]
        self.max_length = limit if max_length is None else max_length
        if self.max_length > limit:
            raise ValueError(f"{self.max_length} positions exceed the model's --max-position-embeddings {limit}")
        self.model = model
        self.caches = {name: KVCache(self.max_length) for name in model.layers}
        retro_cfg = getattr(model, "retro_cfg", None)
        self.chunk_length = retro_cfg.chunk_length if retro_cfg is not None else None
        self.gated = retro_cfg is not None and retro_cfg.attention_gate
        self.length = 0
        self.tokens = None  # [b, max_length] ids fed so far, for the gates' overlap
        self.chunk_states = None  # [b, max_length, h]: cca_norm states at the encoder's layer
        self.encoded = {}  # chunk u -> (E_u [b, k, r, d_enc], mask [b, k], overlap [b, k] or None)
        self.projected = {}  # chunk u -> {retro layer number: CCA keys and values of E_u}

    def chunks_completed_by(self, start: int, end: int) -> range:
        """Chunks whose last position lies in [start, end): their neighbours go with that step."""
        m = self.chunk_length
        return range(start // m, end // m) if m else range(0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, neighbors: dict | None = None) -> torch.Tensor:
        """tokens: int64 [b, n] at positions length .. length + n - 1; neighbors: {chunk u:
        (neighbour tokens [b, k, r], mask bool [b, k])} for chunks completed by this step.
        Returns logits [b, n, V]."""
        model = self.model
        n = tokens.shape[1]
        start, end = self.length, self.length + n
        if end > self.max_length:
            raise ValueError(f"position {end - 1} is beyond the {self.max_length} positions of this decoder")
        neighbors = neighbors or {}
        if neighbors and self.chunk_length is None:
            raise ValueError("neighbours given to a model without chunked cross-attention")
        for u in neighbors:
            last = (u + 1) * self.chunk_length - 1
            if not start <= last < end:
                raise ValueError(f"neighbours of chunk {u} belong to the step feeding position {last}, "
                                 f"this step feeds {start}..{end - 1}")
        if self.gated:
            if self.tokens is None:
                self.tokens = tokens.new_zeros(tokens.shape[0], self.max_length)
            self.tokens[:, start:end] = tokens
        m = self.chunk_length
        embedded = {u: (model.embed_neighbors(t[:, None], mask[:, None])[:, 0], mask,
                        neighbor_overlap(self.tokens[:, u * m:(u + 1) * m], t[:, None], mask[:, None], m)[:, 0]
                        if self.gated else None)
                    for u, (t, mask) in neighbors.items()}

        rope = model.rope(n, offset=start)
        causal, attn_mask = False, None
        if n > 1:  # new tokens see every cached position and the new ones up to themselves
            if start == 0:
                causal = True
            else:
                positions = torch.arange(start, end, device=tokens.device)
                attn_mask = (positions[:, None] >= torch.arange(end, device=tokens.device)[None, :])[None, None]
        h = model.tok_embeddings(tokens)
        for name, layer in model.layers.items():
            x = layer.attend(h, rope, causal=causal, attn_mask=attn_mask, kv_cache=self.caches[name])
            if isinstance(layer, RetroBlock):
                x = x + self._cross_attend(layer, x, start, embedded)
            h = layer.feed_forward(x)
        self.length = end
        self._forget_unreachable()
        return model.output(model.norm(h))

    def _cross_attend(self, layer: RetroBlock, x: torch.Tensor, start: int, embedded: dict) -> torch.Tensor:
        """CCA (gated where the model has gates) for positions start .. start + n - 1."""
        m = self.chunk_length
        hn = layer.cca_norm(x)
        n = hn.shape[1]
        if layer.encoder is not None:
            if self.chunk_states is None:
                self.chunk_states = hn.new_zeros(hn.shape[0], self.max_length, hn.shape[-1])
            self.chunk_states[:, start:start + n] = hn
            for u, (neighbor_embeddings, mask, overlap) in embedded.items():
                states = self.chunk_states[:, u * m:(u + 1) * m]
                self.encoded[u] = (layer.encoder(neighbor_embeddings[:, None], states)[:, 0], mask, overlap)
                self.projected[u] = {}
        out = torch.zeros_like(hn)
        # Position p reads chunk (p - m + 1) // m; positions before m - 1 read nothing.
        p = max(start, m - 1)
        while p < start + n:
            u = (p - m + 1) // m
            stop = min(start + n, (u + 2) * m - 1)
            if u in self.encoded:
                encoded, mask, overlap = self.encoded[u]
                # Each retro layer's keys/values of E_u: projected once, read by up to m tokens.
                projected = self.projected[u]
                if layer.layer_number not in projected:
                    projected[layer.layer_number] = layer.cca.neighbor_keys_values(encoded)
                piece = layer.cca.attend(hn[:, p - start:stop - start], projected[layer.layer_number], mask,
                                         query_offset=p - (u + 1) * m + 1)
                piece = layer.cca_gate(piece)
                if layer.gate is not None:
                    piece = piece * layer.gate.chunk_values(overlap, mask)[:, None, None].to(piece.dtype)
                out[:, p - start:stop - start] = piece
            p = stop
        return out

    def _forget_unreachable(self):
        """Drop encoded neighbours that no future position reads."""
        if self.chunk_length is None:
            return
        first_needed = (self.length - self.chunk_length + 1) // self.chunk_length
        for u in [u for u in self.encoded if u < first_needed]:
            del self.encoded[u], self.projected[u]

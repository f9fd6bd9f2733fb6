"""RetroModel: the GPT decoder where the retro layers also carry chunked cross-attention (CCA)
between self-attention and MLP, and the first retro layer holds the retrieval encoder.

Per retro layer (RETRO paper, Listing 1):
    x = x + attention(norm(x))
    hn = cca_norm(x)
    E = encoder(neighbours, hn)        first retro layer only; E then feeds every later CCA
    x = x + gate(tanh(alpha) * cca(hn, E, mask), overlap)
                                       alpha starts at 0.1 (models/retro/gate.py); the
                                       per-chunk gate, from each chunk's bigram overlap with
                                       its neighbours, only with --retro-attention-gate
    x = x + mlp(norm(x))
Without neighbours (retrieval off) a retro layer is exactly a TransformerBlock, and the model
exactly the GPTModel with the same weights (parameter names are shared, so a GPT state dict
loads into it with strict=False: only the RETRO parameters are missing). Initialised with the
same seed, the decoder's weights equal the GPTModel's: the RETRO parameters are drawn after them.

Plain single-device PyTorch: parallelism is applied from outside (megatron/parallel/).
"""

import torch

from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel
from megatron.models.retro.chunked_cross_attention import ChunkedCrossAttention
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.encoder import RetroEncoder
from megatron.models.retro.gate import AttentionGate, TanhGate, neighbor_overlap
from megatron.transformer.block import TransformerBlock
from megatron.transformer.config import ModelConfig
from megatron.transformer.norm import build_norm

# A RetroBlock's submodules that a TransformerBlock does not have.
RETRIEVAL_PARTS = {"cca_norm", "cca", "cca_gate", "encoder", "gate"}
# The metrics gate_mean and the budget loss on it are logged as, by the trainer's forward step
# (megatron/training/retro_step.py) and the pipeline.
GATE_MEAN, BUDGET_LOSS = "gate mean", "budget loss"


class RetroBlock(TransformerBlock):
    def __init__(self, cfg: ModelConfig, retro_cfg: RetroConfig, layer_number: int, with_encoder: bool):
        super().__init__(cfg, layer_number)
        enc_cfg = retro_cfg.encoder_model_config(cfg)
        self.cca_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.cca = ChunkedCrossAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, retro_cfg.chunk_length,
            kv_dim=enc_cfg.hidden_size, bias=cfg.add_bias_linear, dropout=cfg.attention_dropout,
            rotary_base=cfg.rotary_base)
        self.encoder = (RetroEncoder(enc_cfg, cfg.hidden_size, retro_cfg.chunk_length,
                                     retro_cfg.encoder_cross_attention, retro_cfg.encoder_embedding_skip)
                        if with_encoder else None)
        self.cca_gate = TanhGate(retro_cfg.cca_gate_init)
        self.gate = AttentionGate(retro_cfg.chunk_length, retro_cfg.attention_gate_logit_scale,
                                   retro_cfg.attention_gate_init) if retro_cfg.attention_gate else None

    def forward(self, x: torch.Tensor, rope, neighbors: torch.Tensor | None = None,
                neighbor_mask: torch.Tensor | None = None, overlap: torch.Tensor | None = None):
        """x: [b, s, h]; neighbors: [b, l, k, r, h] embedded neighbour tokens if this layer holds
        the encoder, else [b, l, k, r, d_enc] encoded ones, or None (retrieval off); overlap:
        RetroModel.neighbor_overlap, for the gate. Returns (x, encoded neighbours or None)."""
        x = self.attend(x, rope)
        if self.gate is not None:
            self.gate.last_value = self.gate.last_real = None
        if neighbors is not None:
            hn = self.cca_norm(x)
            if self.encoder is not None:
                neighbors = self.encoder(neighbors, hn)
            out = self.cca_gate(self.cca(hn, neighbors, neighbor_mask))
            if self.gate is not None:
                out = self.gate(out, overlap, neighbor_mask)
            x = x + self.dropout(out)
        return self.feed_forward(x), neighbors


class RetroModel(GPTModel):
    def __init__(self, model_cfg: ModelConfig, retro_cfg: RetroConfig):
        # GPTModel.__init__ calls build_layer, which needs these; plain attributes may be set
        # before nn.Module.__init__.
        self.retro_cfg = retro_cfg
        self.retro_layer_numbers = retro_cfg.retro_layer_numbers(model_cfg.num_layers)
        super().__init__(model_cfg)

    def build_layer(self, layer_number: int):
        if layer_number not in self.retro_layer_numbers:
            return super().build_layer(layer_number)
        return RetroBlock(self.cfg, self.retro_cfg, layer_number,
                          with_encoder=layer_number == self.retro_layer_numbers[0])

    def modules_in_init_order(self):
        """The decoder's modules in GPTModel's order, then the retrieval ones (encoder, CCA, gates):
        one seed then gives RETRO the same decoder weights as its GPT."""
        return sorted(self.named_modules(), key=lambda item: bool(RETRIEVAL_PARTS & set(item[0].split("."))))

    def check_neighbors(self, tokens: torch.Tensor, neighbor_tokens: torch.Tensor,
                        neighbor_mask: torch.Tensor | None):
        b, s = tokens.shape
        m, r = self.retro_cfg.chunk_length, self.retro_cfg.retrieved_length
        l = -(-s // m)
        if neighbor_tokens.dim() != 4:
            raise ValueError(f"neighbor_tokens must be [b, l, k, r], got shape {tuple(neighbor_tokens.shape)}")
        nb, nl, k, nr = neighbor_tokens.shape
        if (nb, nl, nr) != (b, l, r):
            raise ValueError(
                f"neighbor_tokens shape {tuple(neighbor_tokens.shape)} does not fit tokens {tuple(tokens.shape)}: "
                f"expected [{b}, {l} chunks of {m}, k, {r} retrieved tokens]")
        if self.retro_cfg.verify_neighbor_count and k != self.retro_cfg.num_neighbors:
            raise ValueError(f"neighbor_tokens hold {k} neighbours per chunk, --retro-num-neighbors is "
                             f"{self.retro_cfg.num_neighbors}")
        if neighbor_mask is not None and tuple(neighbor_mask.shape) != (b, l, k):
            raise ValueError(f"neighbor_mask shape {tuple(neighbor_mask.shape)}, expected {(b, l, k)}")

    def embed_neighbors(self, neighbor_tokens: torch.Tensor, neighbor_mask: torch.Tensor | None) -> torch.Tensor:
        """[b, l, k, r] ids -> [b, l, k, r, h] with the decoder's embedding, detached unless
        RetroConfig.neighbor_embedding_grad. Masked neighbours' ids may be anything (-1
        included): they are replaced by 0 before the lookup."""
        if neighbor_mask is not None:
            neighbor_tokens = neighbor_tokens.masked_fill(~neighbor_mask[..., None], 0)
        embedded = self.tok_embeddings(neighbor_tokens)
        return embedded if self.retro_cfg.neighbor_embedding_grad else embedded.detach()

    def neighbor_overlap(self, tokens: torch.Tensor, neighbor_tokens: torch.Tensor,
                         neighbor_mask: torch.Tensor | None) -> torch.Tensor | None:
        """What the gates read (models/retro/gate.py), [b, s // m, k]; None without them."""
        if not self.retro_cfg.attention_gate:
            return None
        return neighbor_overlap(tokens, neighbor_tokens, neighbor_mask, self.retro_cfg.chunk_length)

    def forward(self, tokens: torch.Tensor, neighbor_tokens: torch.Tensor | None = None,
                neighbor_mask: torch.Tensor | None = None, *, token_ids: torch.Tensor | None = None,
                encoded_neighbors: torch.Tensor | None = None):
        """tokens [b, s]; neighbor_tokens [b, l, k, r] (None: retrieval off), l = ceil(s / m);
        neighbor_mask bool [b, l, k], True = real neighbour (None: all real). -> logits [b, s, V].

        A pipeline stage is this model with parts pruned, as GPTModel.forward says (``tokens``
        hidden states, ``token_ids`` the ids, also for the gates' overlap). A stage after the
        encoder's gets its ``encoded_neighbors``; before the last stage it returns (hidden
        states, encoded neighbours), or the hidden states alone while no layer has encoded any."""
        ids = tokens if token_ids is None else token_ids
        h = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        rope = self.rope(ids.shape[1])
        neighbors, overlap = encoded_neighbors, None
        if neighbor_tokens is not None:
            self.check_neighbors(ids, neighbor_tokens, neighbor_mask)
            overlap = self.neighbor_overlap(ids, neighbor_tokens, neighbor_mask)
        for layer in self.layers.values():
            if isinstance(layer, RetroBlock):
                if layer.encoder is not None and neighbor_tokens is not None:
                    neighbors = self.embed_neighbors(neighbor_tokens, neighbor_mask)
                h, neighbors = layer(h, rope, neighbors, neighbor_mask, overlap)
            else:
                h = layer(h, rope)
        if self.output is None:
            return h if neighbors is None else (h, neighbors)
        return self.output(self.norm(h))

    def chunk_gates(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate of each whole chunk [b, w], mean over the retro layers; bool [b, w], the chunks
        with a real neighbour) of the last forward; None without --retro-attention-gate or when
        it ran without neighbours."""
        gates = [layer.gate for layer in self.layers.values()
                 if isinstance(layer, RetroBlock) and layer.gate is not None and layer.gate.last_value is not None]
        if not gates:
            return None
        return torch.stack([g.last_value for g in gates]).mean(dim=0), gates[0].last_real

    def gate_mean(self) -> torch.Tensor | None:
        """Mean gate over the retro layers and the chunks with a real neighbour in the last
        forward (a differentiable scalar, for the budget loss); exactly 0 when no neighbour
        reached the model; None as chunk_gates."""
        gates = self.chunk_gates()
        if gates is None:
            return None
        values, real = gates
        # A chunk without a real neighbour has gate 0, so the sum is over the real ones.
        return values.sum() / real.sum().clamp(min=1)


def retro_flops_per_token(model_cfg: ModelConfig, retro_cfg: RetroConfig, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per decoder token of a RetroModel, with retrieval on.

    The GPT count (megatron/models/gpt/flops.py: 6 * N_matmul + 12 * L * s * h, full score matrix)
    plus, with h the decoder width, d the encoder width, f its FFN width, Le its layers of which
    Lc cross-attend, m the chunk length, k neighbours of r tokens, P retro layers, and
    c = ceil(s / m) / s chunks per token (n = c * k * r neighbour tokens per decoder token):

    - CCA, per retro layer: 6 * (c * m * 2 h^2 + n * 2 d h) for wq, wo (on the c * m padded
      chunk positions per token, = 1 when m divides s) and wk, wv (per neighbour token);
      attention 3 * 4 * k * r * h per query position.
    - encoder, once: per neighbour token 6 * (Le * (4 d^2 + F d f) + Lc * 2 d^2 [+ h d if d != h]),
      F = 3 for SwiGLU else 2; per chunk token 6 * Lc * 2 h d (keys/values of the decoder
      chunk); attention 3 * 4 * (Le * r + Lc * m) * d per neighbour token.
    The neighbour embedding is a lookup and is not counted.
    """
    s = model_cfg.seq_length if seq_length is None else seq_length
    enc = retro_cfg.encoder_model_config(model_cfg)
    h, d, f = model_cfg.hidden_size, enc.hidden_size, enc.ffn_hidden_size
    m, k, r = retro_cfg.chunk_length, retro_cfg.num_neighbors, retro_cfg.retrieved_length
    num_retro = len(retro_cfg.retro_layer_numbers(model_cfg.num_layers))
    num_cross = enc.num_layers if retro_cfg.encoder_cross_attention == "all" else 1
    chunks_per_token = -(-s // m) / s
    neighbor_tokens_per_token = chunks_per_token * k * r
    chunk_tokens_per_token = chunks_per_token * m

    cca = (6.0 * (2 * h * h * chunk_tokens_per_token + neighbor_tokens_per_token * 2 * d * h)
           + 12.0 * chunk_tokens_per_token * k * r * h)
    enc_matmul_per_neighbor_token = (enc.num_layers * (4 * d * d + (3 if enc.swiglu else 2) * d * f)
                                     + num_cross * 2 * d * d + (h * d if d != h else 0))
    encoder = (6.0 * (neighbor_tokens_per_token * enc_matmul_per_neighbor_token
                      + chunk_tokens_per_token * num_cross * 2 * h * d)
               + 12.0 * neighbor_tokens_per_token * (enc.num_layers * r + num_cross * m) * d)
    return gpt_flops_per_token(model_cfg, s) + num_retro * cca + encoder

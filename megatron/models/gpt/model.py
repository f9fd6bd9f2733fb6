"""GPTModel: token embedding, pre-norm decoder blocks with RoPE, final norm, output head.

Plain single-device PyTorch: parallelism is applied from outside (megatron/parallel/).
"""

import math

import torch
from torch import nn

from megatron.transformer.block import TransformerBlock
from megatron.transformer.config import ModelConfig
from megatron.transformer.norm import build_norm
from megatron.transformer.rotary import rope_tables


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): self.build_layer(i + 1) for i in range(cfg.num_layers)})
        self.norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if not cfg.untie_embeddings_and_output_weights:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rotary_base,
                               scaling=cfg.rope_scaling)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def build_layer(self, layer_number: int) -> nn.Module:
        return TransformerBlock(self.cfg, layer_number)

    def rope(self, seq_len: int, offset: int = 0):
        if offset + seq_len > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence of {offset + seq_len} tokens exceeds --max-position-embeddings "
                f"{self.rope_cos.shape[0]}"
            )
        return self.rope_cos[offset:offset + seq_len], self.rope_sin[offset:offset + seq_len]

    def modules_in_init_order(self):
        """(name, module) pairs in the order init_weights draws them (subclasses may reorder)."""
        return self.named_modules()

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        """Megatron's init: N(0, std) everywhere, output projections of each block scaled by
        1/sqrt(2 * num_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, module in self.modules_in_init_order():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(".wo") or name.endswith(".w2")
                nn.init.normal_(module.weight, mean=0.0, std=scaled_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and not list(module.children()) and module is not self:
                module.reset_parameters()
        if buffer_device is not None or self.rope_cos.device.type == "meta":
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_position_embeddings,
                                   self.cfg.rotary_base, device=buffer_device, scaling=self.cfg.rope_scaling)
            self.rope_cos, self.rope_sin = cos, sin

    def forward(self, tokens: torch.Tensor, *, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: int64 [b, s] -> logits [b, s, vocab].

        A pipeline stage (megatron/parallel/pipeline.py) is this model with parts pruned: on a
        later stage ``tokens`` are the previous stage's hidden states [b, s, h] and ``token_ids``
        the ids (their length is the rope's: under sequence parallel the states are a shard of
        the sequence); without the head (before the last stage) the hidden states are returned."""
        h = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        rope = self.rope((tokens if token_ids is None else token_ids).shape[1])
        for layer in self.layers.values():
            h = layer(h, rope)
        if self.output is None:
            return h
        return self.output(self.norm(h))


def is_tied(model: nn.Module) -> bool:
    """Whether the output head's weight is the token embedding's (the default; see
    --untie-embeddings-and-output-weights). False where a pipeline stage lacks either."""
    emb, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    return emb is not None and head is not None and head.weight is emb.weight


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied output head counts once)."""
    return sum(p.numel() for p in model.parameters())

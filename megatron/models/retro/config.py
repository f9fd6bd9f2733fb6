"""RetroConfig: the RETRO-specific part of the model (chunks, neighbours, retro layers, encoder).

Filled by pretrain_retro.py from the --retro-* flags; the decoder itself is described by the
ordinary ModelConfig.
"""

import dataclasses
from dataclasses import dataclass

from megatron.transformer.config import ModelConfig

ENCODER_CROSS_ATTENTION_MODES = ("first", "all")


@dataclass
class RetroConfig:
    chunk_length: int = 64  # m
    num_neighbors: int = 2  # k
    retrieved_length: int | None = None  # r: neighbour chunk + continuation; None: 2 * chunk_length
    # 1-based decoder layer numbers that carry chunked cross-attention; None: Megatron-LM's default
    # (see retro_layer_numbers).
    decoder_layers: list[int] | None = None
    encoder_num_layers: int = 2
    encoder_hidden_size: int | None = None  # None: the decoder's hidden size
    encoder_num_attention_heads: int | None = None  # None: the decoder's number of heads
    # Which encoder layers cross-attend to the decoder states of the chunk they serve: the
    # paper (and Megatron-LM) condition the first encoder layer only.
    encoder_cross_attention: str = "first"
    # Add each neighbour token's normalised embedding to the encoder's output (models/retro/encoder.py):
    # without it the output barely tells which token sits where, and copying from neighbours was
    # slow to learn even when they held the text.
    encoder_embedding_skip: bool = True
    # Start of each retro layer's tanh gate on the CCA output (models/retro/gate.py): alpha = 0.1
    # adds a tenth of the CCA's output, too little to slow the decoder, yet enough for the CCA to
    # learn. A gate at 0 (Flamingo's) starts with no CCA gradient and alpha random-walks around 0,
    # flipping the sign of every CCA gradient: on real text it stayed closed for 400-800 steps
    # even with neighbours that hold the text (docs/experiments.md, tools/retro/oracle_neighbors.py).
    cca_gate_init: float = 0.1
    # Whether the retrieval path (encoder input and embedding skip) trains the token embedding it
    # reads the neighbours with (the decoder's, shared with the head when tied), as the paper's
    # does. Off by default: that per-token learning made RETRO train up to 0.03 above its GPT near
    # iteration 150 where its neighbours hold little (the stdlib), and detached it reads real
    # neighbours as well, within the run-to-run spread (docs/experiments.md).
    neighbor_embedding_grad: bool = False
    # Read each neighbour's 2m tokens from where the chunk that retrieved it sits in it, rather than
    # from the DB's chunk boundary (megatron/retrieval/align.py): a copy then lines up with the text
    # it continues, which a small model learns to use; it did not learn to find it by content.
    align_neighbors: bool = True
    attention_gate: bool = False  # learned per-chunk gate on each CCA output (adaptive retrieval)
    # Its logits are this times their parameters, so that Adam's ~lr steps can open or close the
    # gate within a short run, and every chunk's gate starts at attention_gate_init: nearly open,
    # so the gate does not slow the CCA's learning as a half-open start did (models/retro/gate.py).
    attention_gate_logit_scale: float = 30.0
    attention_gate_init: float = 0.9
    # Refuse neighbour tensors whose k differs from num_neighbors; False lets evaluation vary k
    # (the paper evaluates with more neighbours than it trained with).
    verify_neighbor_count: bool = True

    def __post_init__(self):
        if self.retrieved_length is None:
            self.retrieved_length = 2 * self.chunk_length
        for name in ("chunk_length", "num_neighbors", "retrieved_length", "encoder_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetroConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_cross_attention not in ENCODER_CROSS_ATTENTION_MODES:
            raise ValueError(
                f"RetroConfig.encoder_cross_attention {self.encoder_cross_attention!r} not in "
                f"{ENCODER_CROSS_ATTENTION_MODES}")

    def retro_layer_numbers(self, num_layers: int) -> list[int]:
        """The 1-based decoder layers carrying CCA, sorted.

        Default (Megatron-LM): every third layer from layer 6 for up to 15 layers, from layer 9
        above. A model too shallow for that (fewer than 6 layers) takes every third layer counting
        back from its last, down to layer 2 (4 layers: 4; 5: 2, 5), or layer 1 in a 1-layer
        model: a CCA in the last layer learns to copy from neighbours about 3x faster than one
        in layer 2 of 4 (docs/experiments.md).
        """
        if self.decoder_layers is not None:
            numbers = sorted(set(self.decoder_layers))
            bad = [n for n in numbers if not 1 <= n <= num_layers]
            if bad or not numbers:
                raise ValueError(
                    f"--retro-decoder-layers {self.decoder_layers} must name layers in 1..{num_layers}")
            return numbers
        start = 6 if num_layers <= 15 else 9
        numbers = list(range(start, num_layers + 1, 3)) or sorted(range(num_layers, 1, -3))
        return numbers or [1]

    def encoder_model_config(self, model_cfg: ModelConfig) -> ModelConfig:
        """The decoder's config resized to the encoder: width, heads, depth, and the FFN width
        derived for that width (the decoder's own when the widths agree)."""
        hidden = self.encoder_hidden_size or model_cfg.hidden_size
        heads = self.encoder_num_attention_heads or model_cfg.num_attention_heads
        if hidden % heads:
            raise ValueError(
                f"--retro-encoder-hidden-size {hidden} is not divisible by "
                f"--retro-encoder-attention-heads {heads}")
        same_width = hidden == model_cfg.hidden_size
        return dataclasses.replace(
            model_cfg, hidden_size=hidden, num_attention_heads=heads, num_layers=self.encoder_num_layers,
            ffn_hidden_size=model_cfg.ffn_hidden_size if same_width else None)

"""The model's section of the run's configuration (--num-layers, --hidden-size, ...).

Here, in the lowest layer that reads it (the transformer block), as Megatron-core keeps its
TransformerConfig beside its transformer: the models, the parallel plans and training all
import it from here, and nothing here imports them.
"""

from dataclasses import dataclass

from megatron.transformer.rotary import Llama3RopeScaling


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    # Grouped-query attention (--group-query-attention --num-query-groups): the key/value heads,
    # each shared by num_attention_heads / num_query_groups query heads. None: one per query head.
    # Checked where the decoder's attention is built, not here: RETRO's encoder config is this one
    # resized to its own heads, and keeps one key/value head per query head.
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None  # None: 4h for GELU, 8h/3 rounded to 64 for SwiGLU
    seq_length: int = 256
    max_position_embeddings: int | None = None  # None: seq_length
    vocab_size: int = 0  # padded vocabulary, set once the tokenizer is known
    make_vocab_size_divisible_by: int = 128
    normalization: str = "RMSNorm"  # or "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = False
    rotary_base: float = 10000.0
    # Llama-3's RoPE scaling (--use-rope-scaling; HF rope_scaling type "llama3"), defaults Llama-3.1's.
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_linear: bool = False
    add_qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)

    def __post_init__(self):
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.ffn_hidden_size is None:
            if self.swiglu:
                self.ffn_hidden_size = 64 * ((8 * self.hidden_size // 3 + 63) // 64)
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by "
                f"--num-attention-heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads if self.num_query_groups is None else self.num_query_groups

    @property
    def rope_scaling(self) -> Llama3RopeScaling | None:
        if not self.use_rope_scaling:
            return None
        return Llama3RopeScaling(self.rope_scaling_factor, self.rope_scaling_low_freq_factor,
                                 self.rope_scaling_high_freq_factor,
                                 self.rope_scaling_original_max_position_embeddings)


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron pads the vocabulary so the embedding splits evenly and matmuls stay aligned."""
    return divisible_by * ((vocab_size + divisible_by - 1) // divisible_by)

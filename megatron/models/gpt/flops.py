"""Training FLOPs per token of a GPTModel (RETRO's count, which adds to it, is
`retro_flops_per_token` in megatron/models/retro/model.py).

Formula (PaLM, appendix B; the count Megatron-LM's MFU also rests on):

    flops_per_token = 6 * N_matmul + 12 * L * s * h

- N_matmul: parameters that take part in a matmul per token: every linear of every block
  (attention q/k/v/o, MLP) and the output head (V * h), tied or not. Under grouped-query
  attention k and v project to the key/value heads only: 2 * h * (groups * head_dim) each. The input embedding is a
  lookup, not a matmul, so it is excluded (it still counts once through a tied head).
  Norm weights and biases are elementwise and excluded. Forward is 2 FLOPs per parameter per
  token (multiply + add), backward twice that: 6 in all.
- 12 * L * s * h: attention scores q.k^T and the weighted sum of values, 2 * s * h FLOPs each
  per token and layer forward, times 3 for forward + backward. No causal halving: the full
  s x s score matrix is counted, as PaLM does, even though a causal kernel may skip half of it.
  Heads do not change the count (n_heads * head_dim = h here).

The peak MFU divides these FLOPs by is training's: megatron/training/flops.py.
"""

from megatron.transformer.config import ModelConfig


def gpt_matmul_params(cfg: ModelConfig) -> int:
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    kv_width = cfg.num_kv_heads * cfg.head_dim
    attention = 2 * h * h + 2 * h * kv_width
    mlp = (3 if cfg.swiglu else 2) * h * f
    return cfg.num_layers * (attention + mlp) + v * h


def gpt_flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of a GPTModel with this config."""
    s = cfg.seq_length if seq_length is None else seq_length
    return 6.0 * gpt_matmul_params(cfg) + 12.0 * cfg.num_layers * s * cfg.hidden_size

"""FLOPs counted per trained token, and this machine's measured matmul peak for MFU.

Formula (PaLM, appendix B; the count Megatron-LM's MFU also rests on):

    flops_per_token = 6 * N_matmul + 12 * L * s * h

- N_matmul: parameters that take part in a matmul per token: every linear of every block
  (attention q/k/v/o, MLP) and the output head (V * h), tied or not. The input embedding is a
  lookup, not a matmul, so it is excluded (it still counts once through a tied head).
  Norm weights and biases are elementwise and excluded. Forward is 2 FLOPs per parameter per
  token (multiply + add), backward twice that: 6 in all.
- 12 * L * s * h: attention scores q.k^T and the weighted sum of values, 2 * s * h FLOPs each
  per token and layer forward, times 3 for forward + backward. No causal halving: the full
  s x s score matrix is counted, as PaLM does, even though a causal kernel may skip half of it.
  Heads do not change the count (n_heads * head_dim = h here).
"""

import time

import torch

from megatron.training.config import ModelConfig


def gpt_matmul_params(cfg: ModelConfig) -> int:
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    attention = 4 * h * h
    mlp = (3 if cfg.swiglu else 2) * h * f
    return cfg.num_layers * (attention + mlp) + v * h


def gpt_flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of a GPTModel with this config."""
    s = cfg.seq_length if seq_length is None else seq_length
    return 6.0 * gpt_matmul_params(cfg) + 12.0 * cfg.num_layers * s * cfg.hidden_size


def measure_matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                              seconds: float = 1.0) -> float:
    """Best observed FLOP/s of square matmuls on `device` over about `seconds`.

    Uses its own generator so measuring leaves the global RNG streams (and thus training) alone.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = 8192
    else:
        # CPUs without native bf16/fp16 units are 100x slower there: keep one matmul well under a second.
        n = 1024 if dtype == torch.float32 else 256
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(n, n, generator=gen, device=device).to(dtype)
    b = torch.rand(n, n, generator=gen, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: allocation, kernel choice
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * n ** 3 / elapsed)
        runs += 1
    return best

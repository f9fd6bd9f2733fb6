"""GPT training throughput at a few sizes against this machine's measured matmul peak.

Run: python benchmarks/train_throughput.py [--sizes 256 512 768] [--steps 6]

For each size: forward + backward + the trainer's AdamW step (fused) on random tokens (fp32 on
CPU, bf16 autocast on CUDA with --bf16), with the trainer's host-memory setting on a CPU
(--no-keep-freed-host-memory: glibc's defaults); tokens/s and achieved FLOP/s counted by
megatron.models.gpt.flops (6 x matmul parameters + attention per token; see its docstring),
printed beside the peak matmul FLOP/s, as a ratio: the best measured before and after the
sizes, so that a busy moment does not lower it. Not a test: numbers depend on the machine.
"""

import argparse
import time

import torch

from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel, count_parameters
from megatron.models.loss import lm_loss
from megatron.training.config import TrainingConfig
from megatron.training.flops import measure_matmul_peak_flops
from megatron.training.host_memory import keep_freed_host_memory
from megatron.training.optimizer import build_optimizer
from megatron.transformer.config import ModelConfig


def bench(hidden: int, layers: int, seq: int, batch: int, vocab: int, steps: int, device, bf16: bool):
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                      seq_length=seq, vocab_size=vocab)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device)
    model.init_weights()
    opt = build_optimizer(model, TrainingConfig(lr=1e-4))
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: kernels, and the allocator's heap grown to a step's needs
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / elapsed
    return count_parameters(model), tokens_per_s, tokens_per_s * gpt_flops_per_token(cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPUs; very slow on CPUs without bf16)")
    p.add_argument("--keep-freed-host-memory", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kept = args.keep_freed_host_memory and keep_freed_host_memory(device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = measure_matmul_peak_flops(device, dtype)
    results = [(hidden, *bench(hidden, args.layers, args.seq_length, args.micro_batch_size,
                               args.vocab_size, args.steps, device, args.bf16)) for hidden in args.sizes]
    peak = max(peak, measure_matmul_peak_flops(device, dtype))
    print(f"device {device}, {torch.get_num_threads()} threads, {'keeps' if kept else 'returns'} freed host "
          f"memory, measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'hidden':>6} {'layers':>6} {'params(M)':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8}")
    for hidden, params, tps, flops in results:
        print(f"{hidden:>6} {args.layers:>6} {params / 1e6:>9.1f} {tps:>10.0f} {flops / 1e9:>9.1f} "
              f"{flops / peak:>7.0%}")


if __name__ == "__main__":
    main()

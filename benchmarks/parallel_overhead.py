"""Cost of the parallel layouts on this machine: time per training step of tp2, tp2+sp, fsdp2 and
ddp2 against one process on the same global batch, and the bytes each rank sends per step,
counted from the collectives actually issued and set beside the formula for the plan.

Run: python benchmarks/parallel_overhead.py [--model gpt|retro] [--layers 4] [--hidden 256]
         [--seq 256] [--global-batch 8] [--steps 5]

Every layout runs in its own torchrun-style process group (gloo on CPU), fp32. The cores of the
machine are split evenly between the ranks (OMP_NUM_THREADS = cores / ranks), so "1 process"
and "2 processes" use the same hardware; "1 proc/1 thread" is one process on one core. Ratios
are against the first layout run. Not a test: the numbers depend on the machine and on what
else runs on it.

Bytes "sent per rank" use the ring model of each collective over a group of n ranks and a
full tensor of N bytes: all-reduce 2(n-1)/n N, all-gather and reduce-scatter (n-1)/n N.
Formulas (fp32, b = global batch / dp, s, h, L blocks, P parameters):
  tp (no sp): 4L + 2 all-reduces of [b, s, h] (2 per block forward, 2 backward; the
              embedding's forward, the head's input gradient)
  tp + sp:    8L + 4 all-gathers / reduce-scatters of [b, s, h] (the same bytes as tp)
  fsdp:       all-gather P forward, P_blocks again in backward, reduce-scatter P gradients
  ddp:        all-reduce P gradients
RETRO adds per retro layer a gather of the CCA input and an all-reduce of its output (both
directions), the encoder's all-reduces and the neighbour-embedding all-reduce; its formula is
not written out and only the measured bytes are shown. "other" is what no formula counts:
loss-parallel softmax statistics, gradient-norm and logged-loss scalars.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "1 process": dict(nproc=1, parallel={}),
    # The same process on one core: intra-op threads that wait on each other suffer most when
    # other work shares the machine, so this row tells thread trouble from parallel overhead.
    "1 proc/1 thread": dict(nproc=1, parallel={}, threads=1),
    "tp2": dict(nproc=2, parallel=dict(tensor_model_parallel_size=2)),
    "tp2+sp": dict(nproc=2, parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "fsdp2": dict(nproc=2, parallel=dict(data_parallel_type="fsdp")),
    "ddp2": dict(nproc=2, parallel=dict(data_parallel_type="ddp")),
}
BYTES_PER_FLOAT = 4


# ---------------------------------------------------------------- worker (one rank)

def collective_counter():
    """A dispatch mode that adds up, per collective kind, the ring-model bytes this rank sends."""
    from torch.utils._python_dispatch import TorchDispatchMode

    c10d, funcol = torch.ops.c10d, torch.ops._c10d_functional

    def group_size_of(pg_or_name):
        if isinstance(pg_or_name, str):  # functional collectives name their group
            return torch.distributed.distributed_c10d._resolve_process_group(pg_or_name).size()
        return torch.distributed.ProcessGroup.unbox(pg_or_name).size()  # c10d ops pass it boxed

    # op -> (kind, function(args) -> (full tensor bytes, group size))
    ops = {
        funcol.all_reduce.default: ("all_reduce", lambda a: (a[0].nbytes, group_size_of(a[2]))),
        funcol.all_gather_into_tensor.default: ("all_gather", lambda a: (a[0].nbytes * a[1], a[1])),
        funcol.reduce_scatter_tensor.default: ("reduce_scatter", lambda a: (a[0].nbytes, a[2])),
        c10d.allreduce_.default: ("all_reduce", lambda a: (sum(t.nbytes for t in a[0]), group_size_of(a[1]))),
        c10d._allgather_base_.default: ("all_gather", lambda a: (a[0].nbytes, group_size_of(a[2]))),
        c10d._reduce_scatter_base_.default: ("reduce_scatter", lambda a: (a[1].nbytes, group_size_of(a[2]))),
    }
    factor = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sent = {}
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Let DTensor handle its own ops: the collectives it issues then come back here as
            # plain-tensor ops (a mode is switched off while it runs an op itself).
            if any(t is not torch.Tensor and issubclass(t, torch.Tensor) for t in types):
                return NotImplemented
            if func in ops:
                kind, measure = ops[func]
                full, n = measure(args)
                if n > 1:
                    self.sent[kind] = self.sent.get(kind, 0.0) + factor[kind](n) * full
                    self.calls[kind] = self.calls.get(kind, 0) + 1
            return func(*args, **(kwargs or {}))

    return Counter()


def worker(spec: dict, out_path: str):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from megatron.models.gpt.model import GPTModel
    from megatron.models.retro.config import RetroConfig
    from megatron.models.retro.model import RetroModel
    from megatron.parallel.config import ParallelConfig
    from megatron.parallel.mesh import build_device_mesh, data_parallel_rank_and_size
    from megatron.parallel.parallelize import parallelize_model
    from megatron.parallel.tensor_parallel import loss_parallel_context
    from megatron.training.initialize import initialize_distributed
    from megatron.transformer.config import ModelConfig

    parallel_cfg = ParallelConfig(**spec["parallel"])
    env = initialize_distributed(parallel_cfg)
    mesh = build_device_mesh(parallel_cfg, env.device.type) if env.is_distributed else None
    cfg = ModelConfig(**spec["model"])
    torch.manual_seed(0)
    retro_cfg = RetroConfig(**spec["retro"]) if spec["retro"] else None
    model = RetroModel(cfg, retro_cfg) if retro_cfg else GPTModel(cfg)
    model.init_weights()
    parallelize_model(model, parallel_cfg, mesh, loss_parallel=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)

    g = torch.Generator().manual_seed(0)
    b = spec["global_batch"]
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=g).chunk(dp_size)[dp_rank]
    inputs = [tokens[:, :-1]]
    if retro_cfg:
        chunks = -(-cfg.seq_length // retro_cfg.chunk_length)
        nbr = torch.randint(0, cfg.vocab_size, (b, chunks, retro_cfg.num_neighbors, retro_cfg.retrieved_length),
                            generator=g)
        inputs += [nbr.chunk(dp_size)[dp_rank], torch.ones(nbr.shape[:3], dtype=torch.bool).chunk(dp_size)[dp_rank]]

    def step():
        logits = model(*inputs)
        with loss_parallel_context(model):
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss.detach()
        if dp_size > 1:
            dist.all_reduce(loss, group=mesh["dp"].get_group())
        return loss

    for _ in range(2):  # warm-up
        step()
    counter = collective_counter()
    with counter:
        step()
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    if dist.is_initialized():
        dist.barrier()
    seconds = (time.perf_counter() - start) / spec["steps"]
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"seconds": seconds, "sent": counter.sent, "calls": counter.calls}))
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- orchestration

def formula_bytes(layout: dict, cfg: dict, global_batch: int, params: tuple[int, int]) -> float | None:
    """Ring-model bytes each rank sends per step for the GPT plan (see the module docstring)."""
    p = layout["parallel"]
    n = layout["nproc"]
    L, s, h = cfg["num_layers"], cfg["seq_length"], cfg["hidden_size"]
    blocks, total = params
    if p.get("tensor_model_parallel_size", 1) > 1:
        activation = global_batch * s * h * BYTES_PER_FLOAT
        if p.get("sequence_parallel"):
            return (8 * L + 4) * (n - 1) / n * activation
        return (4 * L + 2) * 2 * (n - 1) / n * activation
    if p.get("data_parallel_type") == "fsdp":
        return (n - 1) / n * (total + blocks + total) * BYTES_PER_FLOAT
    if p.get("data_parallel_type") == "ddp" and n > 1:
        return 2 * (n - 1) / n * total * BYTES_PER_FLOAT
    return 0.0


def count_params(cfg: dict, retro: dict | None) -> tuple[int, int]:
    from megatron.models.gpt.model import GPTModel
    from megatron.models.retro.config import RetroConfig
    from megatron.models.retro.model import RetroModel
    from megatron.transformer.config import ModelConfig

    with torch.device("meta"):
        model = RetroModel(ModelConfig(**cfg), RetroConfig(**retro)) if retro else GPTModel(ModelConfig(**cfg))
    blocks = sum(p.numel() for p in model.layers.parameters())
    return blocks, sum(p.numel() for p in model.parameters())


def run_layout(name: str, layout: dict, base: dict, tmp: Path) -> dict:
    spec = dict(base, parallel=layout["parallel"])
    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    cores = os.cpu_count() or 1
    threads = layout.get("threads", max(1, cores // layout["nproc"]))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if layout["nproc"] == 1:
        cmd = [sys.executable, __file__, "--worker", str(spec_path), str(out_path)]
    else:
        env["GLOO_SOCKET_IFNAME"] = env.get("GLOO_SOCKET_IFNAME", "lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(layout["nproc"]), __file__, "--worker", str(spec_path), str(out_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"layout {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt", "retro"], default="gpt")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()

    cfg = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
               seq_length=args.seq, vocab_size=args.vocab)
    retro = dict(chunk_length=64, num_neighbors=2, encoder_num_layers=2) if args.model == "retro" else None
    params = count_params(cfg, retro)
    base = dict(model=cfg, retro=retro, global_batch=args.global_batch, steps=args.steps)
    print(f"{args.model}: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, vocab {args.vocab}, "
          f"global batch {args.global_batch}, {params[1] / 1e6:.2f} M parameters; fp32 on "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'layout':<16} {'s/step':>8} {'vs first':>9} {'sent MB/rank':>13} {'formula MB':>11} "
          f"{'other MB':>9}  collectives per step")
    single = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts:
            layout = LAYOUTS[name]
            result = run_layout(re.sub(r"\W", "_", name), layout, base, Path(tmp))
            single = single or result["seconds"]
            sent = sum(result["sent"].values())
            formula = formula_bytes(layout, cfg, args.global_batch // (
                layout["nproc"] if "data_parallel_type" in layout["parallel"] else 1), params) \
                if args.model == "gpt" else None
            ratio = f"{result['seconds'] / single:.2f}x"
            formula_txt = f"{formula / 1e6:11.2f}" if formula is not None else f"{'-':>11}"
            other = f"{(sent - formula) / 1e6:9.3f}" if formula is not None else f"{'-':>9}"
            calls = ", ".join(f"{k} {v}" for k, v in sorted(result["calls"].items())) or "none"
            print(f"{name:<16} {result['seconds']:8.3f} {ratio:>9} {sent / 1e6:13.2f} {formula_txt} {other}  {calls}",
                  flush=True)


if __name__ == "__main__":
    main()

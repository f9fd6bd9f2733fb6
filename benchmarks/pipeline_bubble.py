"""Pipeline bubble: measured step time of pp2 against one process, for 1F1B and interleaved
1F1B, at several micro-batch counts, next to the bubble fraction theory predicts.

    python benchmarks/pipeline_bubble.py [--kind gpt|retro] [--micro-batches 1 2 4 8 16] ...

One process runs the whole model on one thread; pp2 runs two processes (gloo, one thread each,
so two "devices"). With a perfect pipeline pp2 takes t1 / p; the bubble is the part of the pp2
step spent idle: measured bubble = 1 - (t1 / p) / t_pp. Theory: (p - 1) / (m + p - 1) for 1F1B
(and GPipe), (p - 1) / (V m + p - 1) for interleaved 1F1B with V stages per rank (each bubble
slot is a 1/V-sized stage). Point-to-point sends and the schedule's bookkeeping add to the
measured figure, so it sits above theory, most at small models. Each time is the fastest of
--steps steps (other load on the machine only ever adds time); on a busy shared CPU the figures
are still noise, so run it on an otherwise idle machine.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.models.gpt.model import GPTModel  # noqa: E402
from megatron.models.loss import lm_loss  # noqa: E402
from megatron.models.retro.config import RetroConfig  # noqa: E402
from megatron.models.retro.model import RetroModel  # noqa: E402
from megatron.parallel.config import ParallelConfig  # noqa: E402
from megatron.parallel.mesh import build_device_mesh  # noqa: E402
from megatron.parallel.pipeline import PipelinedModel  # noqa: E402
from megatron.models.loss import next_token_loss  # noqa: E402
from megatron.transformer.config import ModelConfig  # noqa: E402

PP = 2
VOCAB = 256


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_attention_heads=4, seq_length=args.seq_length)
    if args.kind == "retro":
        model = RetroModel(cfg, RetroConfig(chunk_length=16, num_neighbors=2,
                                            decoder_layers=list(range(2, args.num_layers + 1, 3))))
    else:
        model = GPTModel(cfg)
    model.init_weights()
    return model


def make_batch(args, micro_batches: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = micro_batches * args.micro_batch_size
    batch = {"text": torch.randint(0, VOCAB, (n, args.seq_length + 1), generator=g)}
    if args.kind == "retro":
        shape = (n, args.seq_length // 16, 2)
        batch["neighbor_tokens"] = torch.randint(0, VOCAB, (*shape, 32), generator=g)
        batch["neighbor_mask"] = torch.ones(shape, dtype=torch.bool)
    return batch


def timed(step, steps: int) -> float:
    step()  # warm-up (and the pipeline's shape inference)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def single_process_time(args, micro_batches: int) -> float:
    model = build_model(args)
    batch = make_batch(args, micro_batches)

    def step():
        model.zero_grad(set_to_none=True)
        for i in range(micro_batches):
            mb = {k: v.chunk(micro_batches)[i] for k, v in batch.items()}
            extra = (mb["neighbor_tokens"], mb["neighbor_mask"]) if args.kind == "retro" else ()
            (lm_loss(model(mb["text"][:, :-1], *extra), mb["text"][:, 1:]) / micro_batches).backward()

    return timed(step, args.steps)


def pipeline_worker(rank: int, port: int, args, out_path: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=PP)
    mesh = build_device_mesh(ParallelConfig(pipeline_model_parallel_size=PP), "cpu")
    results = {}
    for schedule, virtual in (("1F1B", 1), ("interleaved-1F1B", 2)):
        for m in args.micro_batches:
            stages = PP * virtual
            split = [args.num_layers // stages] * stages
            pipe = PipelinedModel(build_model(args), mesh, num_microbatches=m, schedule=schedule,
                                  virtual_stages=virtual, split=split)
            batch = make_batch(args, m)

            def step():
                for p in pipe.model.parameters():
                    p.grad = None
                pipe.train_step(batch, next_token_loss)

            dist.barrier()
            results[f"{schedule} {m}"] = timed(step, args.steps)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["gpt", "retro"], default="gpt")
    p.add_argument("--num-layers", type=int, default=8, help="divisible by 4 (pp2 x 2 virtual stages)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="per step, each >= p (1F1B's requirement)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.num_layers % (2 * PP):
        p.error(f"--num-layers {args.num_layers} must be divisible by {2 * PP}")
    if min(args.micro_batches) < PP:
        p.error(f"--micro-batches must each be >= p = {PP}")
    torch.set_num_threads(1)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pp.json")
        mp.spawn(pipeline_worker, args=(port, args, out), nprocs=PP, join=True)
        pp_times = json.loads(Path(out).read_text())

    print(f"{args.kind}: {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, p = {PP}, fastest of {args.steps} steps")
    print(f"{'schedule':<18}{'m':>4}{'t1 (s)':>10}{'t_pp (s)':>10}{'speed-up':>10}"
          f"{'bubble measured':>17}{'bubble theory':>15}")
    for m in args.micro_batches:
        t1 = single_process_time(args, m)
        for schedule, virtual in (("1F1B", 1), ("interleaved-1F1B", 2)):
            t_pp = pp_times[f"{schedule} {m}"]
            measured = 1.0 - (t1 / PP) / t_pp
            theory = (PP - 1) / (virtual * m + PP - 1)
            print(f"{schedule:<18}{m:>4}{t1:>10.3f}{t_pp:>10.3f}{t1 / t_pp:>10.2f}{measured:>17.2f}{theory:>15.2f}")


if __name__ == "__main__":
    main()

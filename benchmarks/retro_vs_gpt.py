"""RETRO training cost, in one run: vs the same-size GPT, vs lucidrains' retro-pytorch, vs its loader.

Run (after `bash benchmarks/setup_peer_env.sh` for part 2):
    python benchmarks/retro_vs_gpt.py [--hidden-size 384 --num-layers 6 --seq-length 256 ...]
        [--peer-python /tmp/peer-venv/bin/python | --no-peer] [--work-dir WD | --no-loader]

1. Step time (forward + backward + AdamW) of RetroModel vs GPTModel with the same decoder, and
   each one's achieved FLOP/s: GPT by megatron.training.flops.gpt_flops_per_token, RETRO by
   retro_flops_per_token (the GPT count plus the encoder over the k * r neighbour tokens of
   every chunk and the chunked cross-attention), beside the fp32 matmul peak measured in the
   same run. Aim: RETRO's FLOP/s >= 0.9 x the GPT's (retrieval costs no more than its arithmetic).
2. RETRO tokens/s vs retro-pytorch 0.3.9 (PyPI `retro-pytorch`) on the same configuration. That
   package needs numpy 1.x and pyarrow<20, so it lives in its own virtualenv and runs in a
   subprocess of that venv's python (this same file with --peer-worker), kept alive between
   timings. Aim: >= 1.5x.
3. Samples/s of the RETRO loader (RetroDataset over a real work dir, through
   megatron.data.loader.build_data_loader, in-process: --loader-workers 0) vs RETRO training
   samples/s at the same micro-batch size. Without --work-dir a small one is built first in a
   temporary directory from 12 stdlib files (about 2 minutes), as examples/retro/quickstart.py does.

The machine may be shared, so measurements are interleaved (GPT, RETRO, peer, loader, GPT, ...)
and medians over rounds are reported, with the median of the per-round ratios (each round's two
timings saw the same load). CPU runs are fp32 with --threads (default 2) torch threads.
Not a test: numbers depend on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"


def timed_steps(step, steps: int, sync=lambda: None) -> float:
    """Seconds per call of `step`, averaged over `steps` calls."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------- retro-pytorch (peer venv only)

def peer_worker(spec: dict):
    """Runs under the peer venv's python: builds retro-pytorch's RETRO for `spec`, then for each
    line "N" on stdin times N training steps and answers {"seconds_per_step": ...} on stdout."""
    import torch
    from retro_pytorch import RETRO

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = RETRO(
        num_tokens=spec["vocab_size"], max_seq_len=spec["seq_length"],
        enc_dim=spec["encoder_hidden_size"], enc_depth=spec["encoder_layers"],
        enc_cross_attn_layers=None,  # every encoder layer cross-attends (its default)
        dec_dim=spec["hidden_size"], dec_depth=spec["num_layers"],
        dec_cross_attn_layers=tuple(spec["retro_layers"]),
        heads=spec["heads"], dim_head=spec["hidden_size"] // spec["heads"], chunk_size=spec["chunk_length"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s, m = spec["micro_batch_size"], spec["seq_length"], spec["chunk_length"]
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(1, spec["vocab_size"], (b, s + 1), generator=gen)
    # Ids >= 1: retro-pytorch masks pad id 0, and every neighbour token here is real.
    retrieved = torch.randint(1, spec["vocab_size"], (b, s // m, spec["num_neighbors"], spec["retrieved_length"]),
                              generator=gen)

    def step():
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"seconds_per_step": timed_steps(step, int(line))}), flush=True)


class Peer:
    """The retro-pytorch worker subprocess: build once, time on request."""

    def __init__(self, python: str, spec: dict):
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--peer-worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.params = self._answer()["params"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"retro-pytorch worker exited with code {self.proc.wait()} (see its stderr above)")
        return json.loads(line)

    def time(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._answer()["seconds_per_step"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------- work dir and loader

def build_work_dir(workspace: str, seq_length: int, chunk_length: int, num_neighbors: int,
                   train_samples: int) -> str:
    """A small real work dir from 12 stdlib files (the quickstart's first four steps)."""
    py = sys.executable
    corpus = os.path.join(workspace, "corpus.jsonl")
    tokenizer = os.path.join(workspace, "tokenizer")
    prefix = os.path.join(workspace, "data", "stdlib")
    work_dir = os.path.join(workspace, "retro_workdir")
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]
    commands = [
        [py, "tools/corpus_from_files.py", "--output", corpus, "--max-files", "12"],
        [py, "tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "1024", "--output", tokenizer],
        [py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--json-keys", "text",
         *tok, "--append-eod", "--workers", "1"],
        [py, "tools/retro/preprocess_data.py", "--retro-tasks", "build", "--retro-work-dir", work_dir,
         "--data-path", prefix + "_text_document", *tok, "--split", "90,10,0", "--seq-length", str(seq_length),
         "--seed", "1234", "--train-samples", str(train_samples), "--eval-interval", str(train_samples),
         "--eval-iters", "1", "--global-batch-size", "1", "--retro-gpt-chunk-length", str(chunk_length),
         "--retro-query-num-neighbors-query", "20", "--retro-query-num-neighbors-save", str(num_neighbors)],
    ]
    for cmd in commands:
        print(f"[build work dir] $ {' '.join(cmd[1:3])} ...", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building the work dir failed at {' '.join(cmd)}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return work_dir


def retro_train_dataset(work_dir: str, num_neighbors: int, cache_dir: str):
    """The training RetroDataset of a work dir, read as training reads it (megatron/training/retro.py)."""
    from megatron.retro.workdir import load_workdir_config
    from megatron.training.retro import workdir_dataset

    wd = load_workdir_config(work_dir)
    return workdir_dataset(work_dir, wd, "train", num_neighbors, data_cache_path=cache_dir), wd


def loader_seconds_per_sample(dataset, micro_batch_size: int, max_batches: int, workers: int) -> float:
    from megatron.data.loader import build_data_loader

    loader = build_data_loader(dataset, micro_batch_size, 0, num_workers=workers)
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        samples += batch["text"].shape[0]
        if samples >= max_batches * micro_batch_size:
            break
    return (time.perf_counter() - start) / samples


# ---------------------------------------------------------------- ours

def build_ours(args, vocab_size: int, seq_length: int, chunk_length: int):
    import torch

    from megatron.models.gpt.model import GPTModel
    from megatron.models.retro.config import RetroConfig
    from megatron.models.retro.model import RetroModel
    from megatron.training.config import ModelConfig
    from megatron.training.loss import lm_loss

    # GELU 4h MLP, untied output head, every encoder layer conditioned on the chunk: the layout
    # retro-pytorch has, so that part 2 compares like with like.
    cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                      seq_length=seq_length, vocab_size=vocab_size, swiglu=False,
                      untie_embeddings_and_output_weights=True)
    rcfg = RetroConfig(chunk_length=chunk_length, num_neighbors=args.num_neighbors,
                       decoder_layers=args.retro_layers, encoder_num_layers=args.encoder_layers,
                       encoder_hidden_size=args.encoder_hidden_size, encoder_num_attention_heads=args.heads,
                       encoder_cross_attention="all")
    b, s, k, r = args.micro_batch_size, seq_length, rcfg.num_neighbors, rcfg.retrieved_length
    l = -(-s // chunk_length)
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, vocab_size, (b, s + 1), generator=gen)
    neighbors = torch.randint(0, vocab_size, (b, l, k, r), generator=gen)
    mask = torch.ones(b, l, k, dtype=torch.bool)

    def make(model_cls, *model_args):
        torch.manual_seed(0)
        model = model_cls(*model_args)
        model.init_weights()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        retro = isinstance(model, RetroModel)

        def step():
            logits = model(text[:, :-1], neighbors, mask) if retro else model(text[:, :-1])
            lm_loss(logits, text[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        return model, step

    gpt, gpt_step = make(GPTModel, cfg)
    retro, retro_step = make(RetroModel, cfg, rcfg)
    return cfg, rcfg, gpt, gpt_step, retro, retro_step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8,
                   help="attention heads of decoder and encoder (retro-pytorch uses one head count for both)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--chunk-length", type=int, default=64, help="m; neighbours hold r = 2m tokens")
    p.add_argument("--num-neighbors", type=int, default=2, help="k")
    p.add_argument("--retro-layers", type=int, nargs="+", default=None,
                   help="1-based decoder layers with chunked cross-attention (default: every third from 3)")
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--encoder-hidden-size", type=int, default=None, help="default: --hidden-size")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="training steps per timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help="python of the venv holding retro-pytorch 0.3.9 (benchmarks/setup_peer_env.sh)")
    p.add_argument("--no-peer", action="store_true", help="skip part 2 (retro-pytorch)")
    p.add_argument("--work-dir", default=None,
                   help="existing retro work dir for part 3; its seq length and chunk length then apply to all parts")
    p.add_argument("--no-loader", action="store_true", help="skip part 3 (the loader)")
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--loader-batches", type=int, default=16, help="micro-batches per loader timing")
    p.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_worker is not None:
        return peer_worker(json.loads(args.peer_worker))
    if args.retro_layers is None:
        args.retro_layers = list(range(3, args.num_layers + 1, 3)) or [args.num_layers]

    import torch

    from megatron.models.gpt.model import count_parameters
    from megatron.models.retro.model import retro_flops_per_token
    from megatron.training.flops import gpt_flops_per_token, measure_matmul_peak_flops

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, {os.cpu_count()} CPUs visible")

    # Part 3's data first: a given work dir fixes seq length and chunk length for every part.
    seq_length, chunk_length = args.seq_length, args.chunk_length
    dataset, tmp = None, None
    if not args.no_loader:
        tmp = tempfile.TemporaryDirectory(prefix="retro_vs_gpt_")
        work_dir = args.work_dir
        if work_dir is None:
            work_dir = build_work_dir(tmp.name, seq_length, chunk_length, args.num_neighbors,
                                      train_samples=args.loader_batches * args.micro_batch_size)
        dataset, wd = retro_train_dataset(work_dir, args.num_neighbors, os.path.join(tmp.name, "cache"))
        if (wd["seq_length"], wd["chunk_length"]) != (seq_length, chunk_length):
            print(f"note: work dir {work_dir} has seq length {wd['seq_length']}, chunk length "
                  f"{wd['chunk_length']}: every part uses those")
            seq_length, chunk_length = wd["seq_length"], wd["chunk_length"]
        print(f"loader: {len(dataset)} training samples of work dir {work_dir}")
    if seq_length % chunk_length:
        raise SystemExit(f"seq length {seq_length} must be a multiple of chunk length {chunk_length} "
                         f"(retro-pytorch requires it)")

    cfg, rcfg, gpt, gpt_step, retro, retro_step = build_ours(args, args.vocab_size, seq_length, chunk_length)
    enc_hidden = rcfg.encoder_model_config(cfg).hidden_size
    peer = None
    if not args.no_peer:
        if not os.path.exists(args.peer_python):
            raise SystemExit(f"{args.peer_python}: not found; run `bash benchmarks/setup_peer_env.sh` "
                             f"or pass --peer-python / --no-peer")
        peer = Peer(args.peer_python, {
            "threads": args.threads, "vocab_size": args.vocab_size, "seq_length": seq_length,
            "hidden_size": args.hidden_size, "num_layers": args.num_layers, "heads": args.heads,
            "encoder_hidden_size": enc_hidden, "encoder_layers": args.encoder_layers,
            "retro_layers": rcfg.retro_layer_numbers(cfg.num_layers), "chunk_length": chunk_length,
            "num_neighbors": rcfg.num_neighbors, "retrieved_length": rcfg.retrieved_length,
            "micro_batch_size": args.micro_batch_size})

    # The best matmul rate seen in any round: on a shared machine that is the closest to the peak.
    peak = 0.0
    times = {"gpt": [], "retro": [], "peer": [], "loader": []}
    for i in range(args.rounds):
        peak = max(peak, measure_matmul_peak_flops(device, seconds=0.5))
        times["gpt"].append(timed_steps(gpt_step, args.steps))
        times["retro"].append(timed_steps(retro_step, args.steps))
        if peer is not None:
            times["peer"].append(peer.time(args.steps))
        if dataset is not None:
            times["loader"].append(loader_seconds_per_sample(dataset, args.micro_batch_size, args.loader_batches,
                                                             args.loader_workers))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in times.items() if v),
              flush=True)
    if peer is not None:
        peer.close()
    if tmp is not None:
        tmp.cleanup()

    med = {k: statistics.median(v) for k, v in times.items() if v}

    def paired(num: str, den: str) -> str:
        """Median and range of the per-round ratios: both timings of a round saw the same load."""
        ratios = sorted(a / b for a, b in zip(times[num], times[den]))
        return f"{statistics.median(ratios):.2f}x (per-round {ratios[0]:.2f}-{ratios[-1]:.2f})"

    tokens = args.micro_batch_size * seq_length
    gpt_fpt = gpt_flops_per_token(cfg)
    retro_fpt = retro_flops_per_token(cfg, rcfg)
    gpt_flops = tokens / med["gpt"] * gpt_fpt
    retro_flops = tokens / med["retro"] * retro_fpt

    print()
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {args.heads} heads, seq {seq_length}, "
          f"micro-batch {args.micro_batch_size}, vocab {cfg.vocab_size}, chunk m={chunk_length}, "
          f"k={rcfg.num_neighbors}, r={rcfg.retrieved_length}, retro layers {rcfg.retro_layer_numbers(cfg.num_layers)}, "
          f"encoder {args.encoder_layers} layers x {enc_hidden} (all cross-attending), GELU MLP, untied head")
    print(f"medians of {args.rounds} interleaved rounds x {args.steps} steps; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (best seen in any round)")
    print()
    print("1. step time, fwd+bwd+AdamW")
    print(f"{'model':<14} {'params(M)':>9} {'s/step':>8} {'tokens/s':>9} {'GFLOP/tok':>9} {'GFLOP/s':>8} {'of peak':>7}")
    for name, model, secs, fpt, flops in (("GPT", gpt, med["gpt"], gpt_fpt, gpt_flops),
                                          ("RETRO", retro, med["retro"], retro_fpt, retro_flops)):
        print(f"{name:<14} {count_parameters(model) / 1e6:>9.2f} {secs:>8.3f} {tokens / secs:>9.0f} "
              f"{fpt / 1e9:>9.3f} {flops / 1e9:>8.1f} {flops / peak:>7.0%}")
    fpt_ratio = retro_fpt / gpt_fpt
    print(f"RETRO/GPT step time {med['retro'] / med['gpt']:.2f}x of medians, {paired('retro', 'gpt')} paired; "
          f"FLOPs per token {fpt_ratio:.2f}x")
    print(f"RETRO/GPT FLOP/s {retro_flops / gpt_flops:.2f} of medians, "
          f"{fpt_ratio / statistics.median(r / g for r, g in zip(times['retro'], times['gpt'])):.2f} paired "
          f"(aim >= 0.9)")
    if peer is not None:
        print()
        print("2. RETRO vs retro-pytorch 0.3.9, same configuration")
        print(f"{'model':<14} {'params(M)':>9} {'s/step':>8} {'tokens/s':>9}")
        print(f"{'ours':<14} {count_parameters(retro) / 1e6:>9.2f} {med['retro']:>8.3f} {tokens / med['retro']:>9.0f}")
        print(f"{'retro-pytorch':<14} {peer.params / 1e6:>9.2f} {med['peer']:>8.3f} {tokens / med['peer']:>9.0f}")
        print(f"tokens/s ours / retro-pytorch {med['peer'] / med['retro']:.2f}x of medians, "
              f"{paired('peer', 'retro')} paired (aim >= 1.5x)")
        print("differences that remain: retro-pytorch adds a learned absolute position embedding and rotates "
              "32 dims of each head (ours: RoPE on all dims, no absolute embedding); it has biases on "
              "attention outputs and MLPs, an encoder output projection and a null key/value in CCA; "
              "it masks per token (pad id 0), ours per neighbour; it computes attention with explicit "
              "einsum/softmax, ours with scaled_dot_product_attention")
    if dataset is not None:
        print()
        print(f"3. loader vs training, micro-batch {args.micro_batch_size}, loader workers {args.loader_workers}")
        loader_sps, train_sps = 1 / med["loader"], args.micro_batch_size / med["retro"]
        print(f"loader {loader_sps:.0f} samples/s, RETRO training {train_sps:.2f} samples/s: "
              f"loader {loader_sps / train_sps:.0f}x faster than training")


if __name__ == "__main__":
    main()

"""RETRO training cost, in one run at two sizes: vs the same-size GPT, vs lucidrains' retro-pytorch, vs its loader.

Run (after `bash benchmarks/setup_peer_env.sh` for part 2):
    python benchmarks/retro_vs_gpt.py [--sizes default 512] [--hidden-size 384 --num-layers 6 --seq-length 256 ...]
        [--peer-python /tmp/peer-venv/bin/python | --no-peer] [--work-dir WD | --no-loader]

Sizes (--sizes, both by default), measured side by side in the same rounds:
- "default": the one the size flags describe (hidden 384, 6 layers, seq 256, vocab 8192, ... unless given);
- "512": issue 14's, dim 512, 6 decoder layers with CCA in layers 3 and 6, a 2-layer encoder of
  width 512, 8 heads of 64, seq 512, k = 2 neighbours of 128 tokens (m = 64), batch 4, vocab
  4096, ffn 2048 (the GELU MLP's 4h).

1. Step time (forward + backward + AdamW) of RetroModel vs GPTModel with the same decoder, and
   each one's achieved FLOP/s: GPT by megatron.models.gpt.flops.gpt_flops_per_token, RETRO by
   retro_flops_per_token (the GPT count plus the encoder over the k * r neighbour tokens of
   every chunk and the chunked cross-attention), beside the fp32 matmul peak measured in the
   same run. Aim: RETRO's FLOP/s >= 0.95 x the GPT's (retrieval costs no more than its arithmetic).
2. RETRO vs retro-pytorch 0.3.9 (PyPI `retro-pytorch`) on the same configuration: tokens/s, and
   achieved FLOP/s with each implementation's FLOPs counted for its own architecture
   (retro_pytorch_flops_per_token below), so that the FLOP-normalised ratio says which one runs
   its arithmetic faster. Every count is checked against torch.utils.flop_counter on one forward.
   That package needs numpy 1.x and pyarrow<20, so it lives in its own virtualenv and runs in a
   subprocess of that venv's python (this same file with --peer-worker), one per size, kept alive
   between timings. Aim (issue 14): >= 1.3x tokens/s.
3. Samples/s of the RETRO loader (RetroDataset over a real work dir, through
   megatron.data.loader.build_data_loader, in-process: --loader-workers 0) vs RETRO training
   samples/s of the first size at the same micro-batch size. Without --work-dir a small one is
   built first in a temporary directory from 12 stdlib files (about 2 minutes), as
   examples/retro/quickstart.py does.

The machine may be shared, so measurements are interleaved (per size GPT, RETRO, peer; then the
loader; next round) and medians over rounds are reported, with the median of the per-round
ratios (each round's timings saw the same load). CPU runs are fp32 with --threads (default 2)
torch threads. Not a test: numbers depend on the machine.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"


@dataclasses.dataclass(frozen=True)
class Size:
    """One configuration of the three models, in retro-pytorch's layout: GELU MLP of width 4h,
    untied output head, every encoder layer cross-attending to its chunk, one head count for
    decoder and encoder with dim_head = hidden / heads."""
    name: str
    hidden_size: int
    num_layers: int
    heads: int
    seq_length: int
    chunk_length: int  # m; neighbours hold r = 2m tokens
    num_neighbors: int  # k
    retro_layers: tuple[int, ...]  # 1-based decoder layers with chunked cross-attention
    encoder_layers: int
    encoder_hidden_size: int
    vocab_size: int
    micro_batch_size: int

    @property
    def retrieved_length(self) -> int:
        return 2 * self.chunk_length

    @property
    def tokens(self) -> int:
        """Decoder tokens per training step."""
        return self.micro_batch_size * self.seq_length

    def describe(self) -> str:
        return (f"hidden {self.hidden_size}, {self.num_layers} layers, {self.heads} heads of "
                f"{self.hidden_size // self.heads}, seq {self.seq_length}, micro-batch {self.micro_batch_size}, "
                f"vocab {self.vocab_size}, chunk m={self.chunk_length}, k={self.num_neighbors}, "
                f"r={self.retrieved_length}, retro layers {list(self.retro_layers)}, encoder "
                f"{self.encoder_layers} layers x {self.encoder_hidden_size} (all cross-attending), "
                f"GELU MLP of {4 * self.hidden_size}, untied head")


SIZE_512 = Size("512", hidden_size=512, num_layers=6, heads=8, seq_length=512, chunk_length=64, num_neighbors=2,
                retro_layers=(3, 6), encoder_layers=2, encoder_hidden_size=512, vocab_size=4096, micro_batch_size=4)
SIZE_NAMES = ("default", "512")


def add_size_args(p: argparse.ArgumentParser):
    """--sizes and the flags of the "default" size (benchmarks/profile_step.py takes them too)."""
    p.add_argument("--sizes", nargs="+", choices=SIZE_NAMES, default=list(SIZE_NAMES),
                   help="'default': the size the flags below describe; '512': issue 14's configuration")
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


def sizes_from_args(args) -> list[Size]:
    retro_layers = args.retro_layers or list(range(3, args.num_layers + 1, 3)) or [args.num_layers]
    default = Size("default", hidden_size=args.hidden_size, num_layers=args.num_layers, heads=args.heads,
                   seq_length=args.seq_length, chunk_length=args.chunk_length, num_neighbors=args.num_neighbors,
                   retro_layers=tuple(sorted(set(retro_layers))), encoder_layers=args.encoder_layers,
                   encoder_hidden_size=args.encoder_hidden_size or args.hidden_size,
                   vocab_size=args.vocab_size, micro_batch_size=args.micro_batch_size)
    return [{"default": default, "512": SIZE_512}[name] for name in dict.fromkeys(args.sizes)]


def check_size(size: Size):
    if size.seq_length % size.chunk_length:
        raise SystemExit(f"size {size.name}: seq length {size.seq_length} must be a multiple of chunk length "
                         f"{size.chunk_length} (retro-pytorch requires it)")
    if size.hidden_size % size.heads:
        raise SystemExit(f"size {size.name}: hidden {size.hidden_size} is not divisible by {size.heads} heads")


def timed_steps(step, steps: int, sync=lambda: None) -> float:
    """Seconds per call of `step`, averaged over `steps` calls."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def counted_flops_per_token(forward, tokens: int) -> float:
    """Training FLOPs per token of `forward()` as torch.utils.flop_counter counts its matmuls,
    x 3 for forward + backward: the check of the formulas. Attention runs on the math backend,
    whose full score matmuls the counter sees, as both formulas count them."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        forward()
    return 3 * counter.get_total_flops() / tokens


# ---------------------------------------------------------------- retro-pytorch

# The heads retro-pytorch 0.3.9 runs with, whatever its `heads` argument says.
RETRO_PYTORCH_HEADS = 8


def retro_pytorch_flops_per_token(size: Size) -> float:
    """Training FLOPs (forward + backward) per decoder token of retro-pytorch 0.3.9's RETRO
    (retro_pytorch/retro_pytorch.py) as peer_worker builds it, counted by the rules of ours
    (megatron/models/gpt/flops.py): 6 x the matmul weights each token passes through, plus 12 x
    the attention width per key for scores and weighted sum, full score matrices (its causal
    mask is a masked_fill on the full matrix).

    Its layout: token and absolute position embeddings of the encoder width d, a Linear d -> h
    into the decoder when d != h (to_decoder_model_dim); pre-norm blocks whose attention has
    width a = 8 x dim_head (RETRO does not pass its `heads` on to Encoder and Decoder, which
    default to 8 heads; at both sizes heads is 8 and a = h); FeedForward Linear-GELU-Linear of
    4 x its input width (decoder 4h, encoder 4d); an untied to_logits h -> V. With L decoder
    layers of which P carry CCA, Le encoder layers (enc_cross_attn_layers=None: all
    cross-attend), m the chunk length, k neighbours of r tokens, w = s // m chunks, per decoder
    token:

    - decoder: 6 (L (4 h a + 2 h 4h) + V h [+ d h if d != h]) + 12 L s a;
    - CCA, per retro layer: queries are the w m positions of whole chunks, keys the k r tokens
      of their neighbours plus one learned null key, all h wide (the encoder projects its
      output to h): 6 (w m / s * 2 h a + w k r / s * 2 h a) + 12 w m / s * (k r + 1) a;
    - encoder, per neighbour token (w k r / s of them): self-attention 4 d a and 12 r a, in each
      cross-attention layer q/out 2 d a and 12 m a, FFN 2 d 4d, the output projection
      project_out d h; and per neighbour, the keys/values of the m decoder states of its chunk,
      2 h a m per layer: its context is the chunk repeated for each of the k neighbours.

    Where it differs from retro_flops_per_token (ours) at equal sizes: the encoder's output
    projection (ours has none; ours projects the input h -> d instead, and only when d != h);
    the chunk's keys/values in the encoder, computed k times per chunk (ours once); one more
    key per CCA query (the null key); with heads != 8 the attention width 8 x dim_head rather
    than h; with d != h also its d -> h embedding projection, CCA keys/values from h rather
    than d, and encoder attention of width a rather than d. Biases, norms, embeddings,
    positions and the loss are elementwise or lookups and counted in neither.
    """
    h, d, v, s = size.hidden_size, size.encoder_hidden_size, size.vocab_size, size.seq_length
    a = RETRO_PYTORCH_HEADS * (h // size.heads)
    m, k, r = size.chunk_length, size.num_neighbors, size.retrieved_length
    layers, enc_layers, chunks = size.num_layers, size.encoder_layers, s // size.chunk_length
    queries = chunks * m / s  # CCA query positions per decoder token
    neighbor_tokens = chunks * k * r / s
    decoder = 6.0 * (layers * (4 * h * a + 2 * h * 4 * h) + v * h + (d * h if d != h else 0)) + 12.0 * layers * s * a
    cca = 6.0 * (queries + neighbor_tokens) * 2 * h * a + 12.0 * queries * (k * r + 1) * a
    encoder_matmul_per_neighbor_token = enc_layers * (4 * d * a + 2 * d * 4 * d + 2 * d * a) + d * h
    encoder = (6.0 * (neighbor_tokens * encoder_matmul_per_neighbor_token + chunks * k * m / s * enc_layers * 2 * h * a)
               + 12.0 * neighbor_tokens * enc_layers * (r + m) * a)
    return decoder + len(size.retro_layers) * cca + encoder


def peer_worker(request: dict):
    """Runs under the peer venv's python: builds retro-pytorch's RETRO at request["size"],
    answers its parameter count and counted FLOPs per token, then for each line "N" on stdin
    times N training steps and answers {"seconds_per_step": ...} on stdout."""
    import torch
    from retro_pytorch import RETRO

    size = Size(**dict(request["size"], retro_layers=tuple(request["size"]["retro_layers"])))
    torch.set_num_threads(request["threads"])
    if request["like_ours"]:
        sys.path.insert(0, REPO)  # the peer venv does not install this project; the module needs only torch
        from megatron.training.host_memory import keep_freed_host_memory
        keep_freed_host_memory()
    torch.manual_seed(0)
    model = RETRO(
        num_tokens=size.vocab_size, max_seq_len=size.seq_length,
        enc_dim=size.encoder_hidden_size, enc_depth=size.encoder_layers,
        enc_cross_attn_layers=None,  # every encoder layer cross-attends (its default)
        dec_dim=size.hidden_size, dec_depth=size.num_layers, dec_cross_attn_layers=size.retro_layers,
        heads=size.heads, dim_head=size.hidden_size // size.heads, chunk_size=size.chunk_length)
    model.train()
    # As a user of the package would write it (torch's default AdamW: a for-loop over tensors on
    # CPU), or with --peer-like-ours the fused kernel of our trainer.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if request["like_ours"] else None)
    b, s, m = size.micro_batch_size, size.seq_length, size.chunk_length
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(1, size.vocab_size, (b, s + 1), generator=gen)
    # Ids >= 1: retro-pytorch masks pad id 0, and every neighbour token here is real.
    retrieved = torch.randint(1, size.vocab_size, (b, s // m, size.num_neighbors, size.retrieved_length),
                              generator=gen)

    def step():
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counted = counted_flops_per_token(lambda: model(seq[:, :-1], retrieved), size.tokens)
    step()  # warm-up
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "counted_flops_per_token": counted}),
          flush=True)
    for line in sys.stdin:
        print(json.dumps({"seconds_per_step": timed_steps(step, int(line))}), flush=True)


class Peer:
    """A retro-pytorch worker subprocess for one size: build once, time on request."""

    def __init__(self, python: str, size: Size, threads: int, like_ours: bool):
        request = {"size": dataclasses.asdict(size), "threads": threads, "like_ours": like_ours}
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--peer-worker", json.dumps(request)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        answer = self._answer()
        self.params, self.counted_flops_per_token = answer["params"], answer["counted_flops_per_token"]

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
    """The training RetroDataset of a work dir, read as training reads it (megatron/retrieval/neighbors.py)."""
    from megatron.retrieval.workdir import load_workdir_config
    from megatron.retrieval.neighbors import workdir_dataset

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

def model_configs(size: Size):
    """Our ModelConfig and RetroConfig for `size` (retro-pytorch's layout, not our training defaults)."""
    from megatron.models.retro.config import RetroConfig
    from megatron.transformer.config import ModelConfig

    cfg = ModelConfig(num_layers=size.num_layers, hidden_size=size.hidden_size, num_attention_heads=size.heads,
                      seq_length=size.seq_length, vocab_size=size.vocab_size, swiglu=False,
                      untie_embeddings_and_output_weights=True)
    rcfg = RetroConfig(chunk_length=size.chunk_length, num_neighbors=size.num_neighbors,
                       decoder_layers=list(size.retro_layers), encoder_num_layers=size.encoder_layers,
                       encoder_hidden_size=size.encoder_hidden_size, encoder_num_attention_heads=size.heads,
                       encoder_cross_attention="all")
    return cfg, rcfg


def random_batch(size: Size) -> dict:
    """A loader-style batch of random ids: "text" [b, s + 1], "neighbor_tokens" [b, l, k, r],
    "neighbor_mask" [b, l, k] (every neighbour real)."""
    import torch

    b, s, k = size.micro_batch_size, size.seq_length, size.num_neighbors
    l = s // size.chunk_length
    gen = torch.Generator().manual_seed(1)
    return {"text": torch.randint(0, size.vocab_size, (b, s + 1), generator=gen),
            "neighbor_tokens": torch.randint(0, size.vocab_size, (b, l, k, size.retrieved_length), generator=gen),
            "neighbor_mask": torch.ones(b, l, k, dtype=torch.bool)}


def build_models(size: Size):
    """(cfg, rcfg, GPT, RETRO), initialised from one seed (the RETRO's decoder starts as the GPT),
    in training mode."""
    import torch

    from megatron.models.gpt.model import GPTModel
    from megatron.models.retro.model import RetroModel

    cfg, rcfg = model_configs(size)
    models = []
    for model_cls, model_args in ((GPTModel, (cfg,)), (RetroModel, (cfg, rcfg))):
        torch.manual_seed(0)
        model = model_cls(*model_args)
        model.init_weights()
        models.append(model.train())
    return cfg, rcfg, *models


def model_forward(model, batch: dict):
    """Logits of the batch's tokens; a RETRO reads the neighbours too."""
    from megatron.models.retro.model import RetroModel

    tokens = batch["text"][:, :-1]
    if isinstance(model, RetroModel):
        return model(tokens, batch["neighbor_tokens"], batch["neighbor_mask"])
    return model(tokens)


def training_step(model, batch: dict):
    """A warmed-up step function: forward, LM loss, backward, and the trainer's AdamW
    (megatron.training.optimizer.build_optimizer: fused, Megatron's weight-decay groups)."""
    from megatron.models.loss import lm_loss
    from megatron.training.config import TrainingConfig
    from megatron.training.optimizer import build_optimizer

    opt = build_optimizer(model, TrainingConfig(lr=1e-4))

    def step():
        lm_loss(model_forward(model, batch), batch["text"][:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    return step


@dataclasses.dataclass
class Contenders:
    """What is timed at one size, and each one's FLOPs per token by formula and as counted."""
    size: Size
    params: dict[str, int]
    steps: dict  # name -> step function; "peer" is the worker
    flops: dict[str, float]
    counted: dict[str, float]


def build_contenders(size: Size, peer_python: str | None, threads: int, peer_like_ours: bool) -> Contenders:
    from megatron.models.gpt.flops import gpt_flops_per_token
    from megatron.models.gpt.model import count_parameters
    from megatron.models.retro.model import retro_flops_per_token

    cfg, rcfg, gpt, retro = build_models(size)
    batch = random_batch(size)
    c = Contenders(size, params={"gpt": count_parameters(gpt), "retro": count_parameters(retro)},
                   steps={"gpt": training_step(gpt, batch), "retro": training_step(retro, batch)},
                   flops={"gpt": gpt_flops_per_token(cfg), "retro": retro_flops_per_token(cfg, rcfg)},
                   counted={"gpt": counted_flops_per_token(lambda: model_forward(gpt, batch), size.tokens),
                            "retro": counted_flops_per_token(lambda: model_forward(retro, batch), size.tokens)})
    if peer_python is not None:
        peer = Peer(peer_python, size, threads, peer_like_ours)
        c.params["peer"], c.steps["peer"] = peer.params, peer
        c.flops["peer"], c.counted["peer"] = retro_pytorch_flops_per_token(size), peer.counted_flops_per_token
    return c


# ---------------------------------------------------------------- measuring and reporting

NAMES = {"gpt": "GPT", "retro": "RETRO", "peer": "retro-pytorch"}


def run_rounds(contenders: list[Contenders], rounds: int, steps: int, loader_timing=None):
    """Times every step of every size, then the loader, round after round. Returns
    ({size name: {contender: [seconds per step, one per round]}}, [loader seconds per sample],
    the best fp32 matmul rate seen: on a shared machine the closest to the peak)."""
    import torch

    from megatron.training.flops import measure_matmul_peak_flops

    times = {c.size.name: {name: [] for name in c.steps} for c in contenders}
    loader_times, peak = [], 0.0
    for i in range(rounds):
        peak = max(peak, measure_matmul_peak_flops(torch.device("cpu"), seconds=0.5))
        line = []
        for c in contenders:
            for name, step in c.steps.items():
                seconds = step.time(steps) if isinstance(step, Peer) else timed_steps(step, steps)
                times[c.size.name][name].append(seconds)
                line.append(f"{c.size.name}/{name} {seconds:.4f}s")
        if loader_timing is not None:
            loader_times.append(loader_timing())
            line.append(f"loader {loader_times[-1]:.4f}s")
        print(f"round {i + 1}/{rounds}: " + ", ".join(line), flush=True)
    return times, loader_times, peak


def paired(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Sorted per-round ratios num / den: both timings of a round saw the same load."""
    return sorted(a / b for a, b in zip(times[num], times[den]))


def ratio_text(of_medians: float, per_round: list[float], aim: str = "") -> str:
    return (f"{of_medians:.2f}x of medians, {statistics.median(per_round):.2f}x "
            f"(per-round {per_round[0]:.2f}-{per_round[-1]:.2f}) paired{aim}")


def size_ratios(c: Contenders, times: dict[str, list[float]]) -> dict[str, tuple[float, list[float]]]:
    """(ratio of medians, sorted per-round ratios) of what the report compares at one size."""
    med = {name: statistics.median(v) for name, v in times.items()}
    flop_ratio = c.flops["retro"] / c.flops["gpt"]
    ratios = {"retro/gpt FLOP/s": (flop_ratio * med["gpt"] / med["retro"],
                                   [flop_ratio * x for x in paired(times, "gpt", "retro")])}
    if "peer" in times:
        peer_flop_ratio = c.flops["retro"] / c.flops["peer"]
        ratios["tokens/s ours/peer"] = (med["peer"] / med["retro"], paired(times, "peer", "retro"))
        ratios["FLOP/s ours/peer"] = (peer_flop_ratio * med["peer"] / med["retro"],
                                      [peer_flop_ratio * x for x in paired(times, "peer", "retro")])
    return ratios


def report_size(c: Contenders, times: dict[str, list[float]], peak: float):
    size, med = c.size, {name: statistics.median(v) for name, v in times.items()}
    ratios = size_ratios(c, times)
    print()
    print(f"== size {size.name}: {size.describe()}")
    print(f"{'model':<14} {'params(M)':>9} {'s/step':>8} {'tokens/s':>9} {'GFLOP/tok':>9} {'GFLOP/s':>8} {'of peak':>7}")
    for name in times:
        flops = size.tokens / med[name] * c.flops[name]
        print(f"{NAMES[name]:<14} {c.params[name] / 1e6:>9.2f} {med[name]:>8.3f} {size.tokens / med[name]:>9.0f} "
              f"{c.flops[name] / 1e9:>9.3f} {flops / 1e9:>8.1f} {flops / peak:>7.0%}")
    print("FLOPs per token, formula / torch.utils.flop_counter on one forward: "
          + ", ".join(f"{NAMES[name]} {c.flops[name] / c.counted[name]:.4f}" for name in times))
    print(f"1. RETRO/GPT step time {med['retro'] / med['gpt']:.2f}x, FLOPs per token "
          f"{c.flops['retro'] / c.flops['gpt']:.2f}x; RETRO/GPT FLOP/s "
          f"{ratio_text(*ratios['retro/gpt FLOP/s'], ' (aim >= 0.95)')}")
    if "peer" in times:
        print(f"2. tokens/s ours / retro-pytorch {ratio_text(*ratios['tokens/s ours/peer'], ' (aim >= 1.3x)')}")
        print(f"   FLOP/s ours / retro-pytorch (each by its own count) {ratio_text(*ratios['FLOP/s ours/peer'])}")


def report_summary(contenders: list[Contenders], times: dict):
    """The ratios of every size side by side (medians of the per-round ratios)."""
    rows = {}
    for c in contenders:
        for label, (_, per_round) in size_ratios(c, times[c.size.name]).items():
            rows.setdefault(label, {})[c.size.name] = statistics.median(per_round)
    print()
    print("summary, paired ratios:" + "".join(f" {c.size.name:>10}" for c in contenders))
    for label, by_size in rows.items():
        print(f"{label:<23}" + "".join(f" {by_size[c.size.name]:>10.2f}" for c in contenders))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(p)
    p.add_argument("--steps", type=int, default=2, help="training steps per timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help="python of the venv holding retro-pytorch 0.3.9 (benchmarks/setup_peer_env.sh)")
    p.add_argument("--no-peer", action="store_true", help="skip part 2 (retro-pytorch)")
    p.add_argument("--keep-freed-host-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="ours as the trainer runs on a CPU: glibc keeps freed memory for reuse "
                        "(megatron/training/host_memory.py)")
    p.add_argument("--peer-like-ours", action="store_true",
                   help="retro-pytorch with our trainer's host-memory setting and fused AdamW too, so that "
                        "the ratio compares the models' code alone (default: as a user of the package runs it)")
    p.add_argument("--work-dir", default=None,
                   help="existing retro work dir for part 3; its seq length and chunk length then apply "
                        "to the first size")
    p.add_argument("--no-loader", action="store_true", help="skip part 3 (the loader)")
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--loader-batches", type=int, default=16, help="micro-batches per loader timing")
    p.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_worker is not None:
        return peer_worker(json.loads(args.peer_worker))

    import torch

    torch.set_num_threads(args.threads)
    kept = False
    if args.keep_freed_host_memory:
        from megatron.training.host_memory import keep_freed_host_memory
        kept = keep_freed_host_memory()
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    peer_setup = ("like ours (kept, fused AdamW)" if args.peer_like_ours
                  else "as its users run it (glibc defaults, torch AdamW)")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, {os.cpu_count()} CPUs visible; ours "
          f"{'keeps' if kept else 'returns'} freed host memory, retro-pytorch {peer_setup}")
    sizes = sizes_from_args(args)

    # Part 3's data first: a given work dir fixes seq length and chunk length of the first size.
    dataset, tmp = None, None
    if not args.no_loader:
        first = sizes[0]
        tmp = tempfile.TemporaryDirectory(prefix="retro_vs_gpt_")
        work_dir = args.work_dir or build_work_dir(tmp.name, first.seq_length, first.chunk_length,
                                                   first.num_neighbors,
                                                   train_samples=args.loader_batches * first.micro_batch_size)
        dataset, wd = retro_train_dataset(work_dir, first.num_neighbors, os.path.join(tmp.name, "cache"))
        if (wd["seq_length"], wd["chunk_length"]) != (first.seq_length, first.chunk_length):
            print(f"note: work dir {work_dir} has seq length {wd['seq_length']}, chunk length "
                  f"{wd['chunk_length']}: size {first.name} uses those")
            sizes[0] = dataclasses.replace(first, seq_length=wd["seq_length"], chunk_length=wd["chunk_length"])
        print(f"loader: {len(dataset)} training samples of work dir {work_dir}")
    for size in sizes:
        check_size(size)
    peer_python = None
    if not args.no_peer:
        if not os.path.exists(args.peer_python):
            raise SystemExit(f"{args.peer_python}: not found; run `bash benchmarks/setup_peer_env.sh` "
                             f"or pass --peer-python / --no-peer")
        peer_python = args.peer_python
        for size in sizes:
            if size.heads != RETRO_PYTORCH_HEADS:
                print(f"note: size {size.name} has {size.heads} heads; retro-pytorch runs {RETRO_PYTORCH_HEADS} "
                      f"of dim_head {size.hidden_size // size.heads} whatever it is told, so its attention is "
                      f"{RETRO_PYTORCH_HEADS * (size.hidden_size // size.heads)} wide (counted so in its FLOPs)")

    contenders = [build_contenders(size, peer_python, args.threads, args.peer_like_ours) for size in sizes]
    loader_timing = None if dataset is None else (
        lambda: loader_seconds_per_sample(dataset, sizes[0].micro_batch_size, args.loader_batches, args.loader_workers))
    times, loader_times, peak = run_rounds(contenders, args.rounds, args.steps, loader_timing)
    for c in contenders:
        if "peer" in c.steps:
            c.steps["peer"].close()
    if tmp is not None:
        tmp.cleanup()

    print()
    print(f"medians of {args.rounds} interleaved rounds x {args.steps} steps; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (best seen in any round); steps are fwd+bwd+AdamW")
    for c in contenders:
        report_size(c, times[c.size.name], peak)
    report_summary(contenders, times)
    if peer_python is not None:
        print("differences from retro-pytorch that remain: it adds a learned absolute position embedding and "
              "rotates 32 dims of each head (ours: RoPE on all dims, no absolute embedding); it has biases on "
              "attention outputs and MLPs (in neither FLOP count); an encoder output projection, a null "
              "key/value in CCA, and each chunk's keys/values in the encoder projected once per neighbour "
              "(all three in its count, retro_pytorch_flops_per_token); it masks per token (pad id 0), ours "
              "per neighbour; it computes attention with explicit einsum/softmax, ours with "
              "scaled_dot_product_attention")
    if dataset is not None:
        first = sizes[0]
        loader_sps = 1 / statistics.median(loader_times)
        train_sps = first.micro_batch_size / statistics.median(times[first.name]["retro"])
        print()
        print(f"3. loader vs training (size {first.name}), micro-batch {first.micro_batch_size}, "
              f"loader workers {args.loader_workers}")
        print(f"loader {loader_sps:.0f} samples/s, RETRO training {train_sps:.2f} samples/s: "
              f"loader {loader_sps / train_sps:.0f}x faster than training")


if __name__ == "__main__":
    main()

"""Generation speed: tokens/s with live retrieval vs without, and retrieval's share of the time.

    python benchmarks/generation.py --retro-work-dir wd [--load ckpt/retro] [--new-tokens 448]

With --load, the checkpoint's RETRO model; otherwise a randomly initialised one of the given size
(speed does not depend on the weights) using the work dir's tokenizer and chunk length. The
prompt is the start of the first DB document. Modes, all greedy with the KV cache:
- off: no neighbours (the decoder alone);
- on: live retrieval at every chunk boundary (BERT embedding of the chunk, index search, chunk
  DB read, neighbour encoding); "retrieval_share" is the embedding + search + read time over
  the total (encoding is model time);
- random: random DB chunks as neighbours (retrieval cost without BERT and search; the rest as on);
- full_recompute_off (with --full-recompute): no cache, each token re-runs the whole prefix
  (how Megatron-LM's RETRO generated), for the cache's speed-up.
Prints one JSON object.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from megatron.inference.generation import SamplingConfig, generate
from megatron.inference.retrieval import LiveRetriever
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.workdir import build_workdir_tokenizer, load_workdir_config
from megatron.training.retro_checkpoint import load_for_generation
from megatron.transformer.config import ModelConfig, pad_vocab_size


def random_model(args, wd_cfg, tokenizer, device):
    cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_attention_heads, seq_length=args.max_positions,
                      vocab_size=pad_vocab_size(tokenizer.vocab_size, 128))
    with torch.device(device):
        model = RetroModel(cfg, RetroConfig(chunk_length=wd_cfg["chunk_length"], num_neighbors=args.num_neighbors))
        model.init_weights()
    return model.eval()


@torch.no_grad()
def full_recompute(model, prompt, new_tokens, device) -> float:
    """Seconds to generate greedily by re-running the whole prefix for every token, no retrieval."""
    tokens = torch.tensor([prompt], device=device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retro-work-dir", required=True)
    p.add_argument("--load", default=None, help="a pretrain_retro.py checkpoint (default: a random model)")
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-neighbors", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default: up to the model's last position")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the best is kept)")
    p.add_argument("--full-recompute", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wd_cfg = load_workdir_config(args.retro_work_dir)
    if args.load:
        model, tokenizer, cfg = load_for_generation(args.load, args.retro_work_dir, device)
        num_neighbors = cfg.retro.model.num_neighbors
        align = cfg.retro.model.align_neighbors  # a GPT checkpoint has no retro_cfg
    else:
        tokenizer = build_workdir_tokenizer(args.retro_work_dir, wd_cfg)
        model = random_model(args, wd_cfg, tokenizer, device)
        num_neighbors = args.num_neighbors
        align = model.retro_cfg.align_neighbors
    positions = model.rope_cos.shape[0]
    db = ChunkDB(args.retro_work_dir, wd_cfg)
    first_document = np.flatnonzero(np.asarray(db.chunks[:, 2]) == 0)
    prompt = np.concatenate([db.get_tokens([c])[0] for c in first_document[:8]])
    prompt = [int(t) for t in prompt[prompt != db.eod][:args.prompt_tokens]]
    new_tokens = min(args.new_tokens or positions, positions - len(prompt))

    retrievers = {"on": LiveRetriever(args.retro_work_dir, tokenizer, num_neighbors, "on", device=device,
                                      align_neighbors=align),
                  "random": LiveRetriever(args.retro_work_dir, tokenizer, num_neighbors, "random",
                                          align_neighbors=align)}
    retrievers["on"].retrieve(np.array([prompt[:db.chunk_length]]))  # loads BERT before timing
    results = {"device": str(device), "model": "checkpoint " + args.load if args.load else "random",
               "parameters": sum(p.numel() for p in model.parameters()), "chunk_length": db.chunk_length,
               "num_neighbors": num_neighbors, "db_chunks": db.num_chunks, "index": wd_cfg.get("chosen_index_str"),
               "prompt_tokens": len(prompt), "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    generate(model, prompt, db.chunk_length, retrievers["on"], SamplingConfig(greedy=True))  # warm-up
    best = {}
    for _ in range(args.repeats):  # modes interleaved, so that load from elsewhere hits them alike
        for mode in ("off", "on", "random"):
            out = generate(model, prompt, new_tokens, retrievers.get(mode), SamplingConfig(greedy=True))
            if mode not in best or out.seconds < best[mode].seconds:
                best[mode] = out
    for mode, out in best.items():
        results[mode] = {"tokens_per_second": len(out.generated) / out.seconds, "seconds": out.seconds,
                         "retrieval_seconds": out.retrieval_seconds,
                         "retrieval_share": out.retrieval_seconds / out.seconds,
                         "chunks_retrieved": len(out.retrievals)}
    off = results["off"]["tokens_per_second"]
    results["ratio_on_over_off"] = results["on"]["tokens_per_second"] / off
    results["ratio_random_over_off"] = results["random"]["tokens_per_second"] / off
    if args.full_recompute:
        seconds = full_recompute(model, prompt, new_tokens, device)
        results["full_recompute_off"] = {"tokens_per_second": new_tokens / seconds, "seconds": seconds}
        results["kv_cache_speedup_off"] = off / results["full_recompute_off"]["tokens_per_second"]
    print("$ python " + " ".join(["benchmarks/generation.py", *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

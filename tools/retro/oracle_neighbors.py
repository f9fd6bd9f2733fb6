"""How fast does a RETRO configuration learn to read neighbours that surely hold the text?

    python tools/retro/oracle_neighbors.py --data-prefix DATA/corpus_text_document --steps 400 \
        --retro-decoder-layers 4 --retro-cca-gate-init 0.1

A diagnostic for when retrieval does not pay: it separates "the neighbours do not hold the
continuation" (a work-dir question, evaluate.py --overlap-buckets) from "the model cannot learn to
use them in this budget" (this tool). It trains a RETRO on windows of a tokenized corpus (.bin/.idx)
in which a fraction (--useful) of the chunks get, as neighbour 0, the chunk itself and its
continuation (chunks u and u+1 of the window, what RETRO retrieves at best), displaced by up to
--displace tokens so that only content matching (not position) finds the text; every other
neighbour is a random window of the corpus. The last 10% of the stream is held out.

Before training and every --log-interval steps it prints one JSON line: the training loss, and on a fixed held-out
batch the loss with neighbours on and off, over all tokens and over the "readers" of useful chunks
(positions (u+1)m-1 .. (u+2)m-2, which predict chunk u+1 and read chunk u's neighbours), plus each
retro layer's tanh gate. readers_off - readers_on is what retrieval is worth where it must help.

Not a benchmark of a real work dir: the neighbours are leaked on purpose. AdamW, betas (0.9,
0.95), weight decay 0.01, clipping 1.0, and the trainer's schedule (lr_at: linear warmup over 5%,
then cosine to lr / 10), as the quickstart trains.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from megatron.data.indexed_dataset import IndexedDataset
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.gate import TanhGate
from megatron.training import retro_config, retro_step
from megatron.training.config import Config
from megatron.training.lr_schedule import lr_at
from megatron.transformer.config import ModelConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-prefix", required=True, help="tokenized corpus, without .bin/.idx")
    p.add_argument("--vocab-size", type=int, required=True, help="the tokenizer's (ids must be below)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--retro-chunk-length", type=int, default=64)
    p.add_argument("--retro-num-neighbors", type=int, default=2)
    p.add_argument("--retro-decoder-layers", type=int, nargs="+", default=None)
    p.add_argument("--retro-encoder-layers", type=int, default=2)
    p.add_argument("--retro-encoder-hidden-size", type=int, default=None)
    p.add_argument("--retro-encoder-attention-heads", type=int, default=None)
    p.add_argument("--retro-cca-gate-init", type=float, default=RetroConfig.cca_gate_init)
    p.add_argument("--retro-encoder-embedding-skip", action=argparse.BooleanOptionalAction,
                   default=RetroConfig.encoder_embedding_skip)
    p.add_argument("--useful", type=float, default=0.5, help="share of chunks whose neighbour 0 holds the text")
    p.add_argument("--displace", type=int, default=0,
                   help="shift the useful neighbour by a random 0..N tokens (N < chunk length)")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if not 0 <= args.displace < args.retro_chunk_length:
        p.error(f"--displace {args.displace} must be in 0..{args.retro_chunk_length - 1}")
    return args


class OracleBatches:
    """Windows of one token stream with leaked neighbours (see the module docstring)."""

    def __init__(self, stream: np.ndarray, args):
        self.stream, self.s, self.m = stream, args.seq_length, args.retro_chunk_length
        self.k, self.useful, self.displace = args.retro_num_neighbors, args.useful, args.displace
        self.chunks = self.s // self.m
        self.cut = int(len(stream) * 0.9)
        need = self.s + 2 * self.m + 1 + self.displace
        if self.cut - need < 1 or len(stream) - self.cut - need < 1:
            raise SystemExit(f"error: {len(stream)} tokens are too few for windows of {need} in a 90/10 split")

    def window(self, start: int, length: int) -> np.ndarray:
        return self.stream[start:start + length]

    def __call__(self, b: int, held_out: bool, g: np.random.Generator):
        """(batch for forward_step, useful [b, l]) from the training or the held-out part."""
        s, m, l, k = self.s, self.m, self.chunks, self.k
        lo, hi = (self.cut, len(self.stream)) if held_out else (0, self.cut)
        starts = g.integers(lo + self.displace, hi - s - 2 * m - 1, b)
        text = np.stack([self.window(x, s + 1) for x in starts])
        random_starts = g.integers(0, self.cut - 2 * m, (b, l, k))
        neighbors = np.stack([[[self.window(x, 2 * m) for x in row] for row in sample] for sample in random_starts])
        useful = g.random((b, l)) < self.useful
        shift = g.integers(0, self.displace + 1, (b, l))
        for i, u in zip(*np.nonzero(useful)):
            neighbors[i, u, 0] = self.window(starts[i] + u * m - shift[i, u], 2 * m)
        batch = {"text": torch.from_numpy(text.astype(np.int64)),
                 "neighbor_tokens": torch.from_numpy(neighbors.astype(np.int64)),
                 "neighbor_mask": torch.ones(b, l, k, dtype=torch.bool)}
        return batch, torch.from_numpy(useful)


def reader_positions(useful: torch.Tensor, s: int, m: int) -> torch.Tensor:
    """bool [b, s]: the positions that read a useful chunk's neighbours and predict its continuation."""
    readers = torch.zeros(useful.shape[0], s, dtype=torch.bool)
    for u in range(useful.shape[1] - 1):
        readers[:, (u + 1) * m - 1:(u + 2) * m - 1] = useful[:, u, None]
    return readers


def build(args):
    cfg = Config(model=ModelConfig(vocab_size=args.vocab_size, num_layers=args.num_layers,
                                   hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                                   seq_length=args.seq_length))
    cfg.retro = retro_config.RetroTrainingConfig(add_retriever=True, model=RetroConfig(
        chunk_length=args.retro_chunk_length, num_neighbors=args.retro_num_neighbors,
        decoder_layers=args.retro_decoder_layers, encoder_num_layers=args.retro_encoder_layers,
        encoder_hidden_size=args.retro_encoder_hidden_size,
        encoder_num_attention_heads=args.retro_encoder_attention_heads, cca_gate_init=args.retro_cca_gate_init,
        encoder_embedding_skip=args.retro_encoder_embedding_skip))
    torch.manual_seed(args.seed)
    model = retro_step.model_provider(cfg)
    model.init_weights()
    return model, retro_step.make_forward_step(cfg)


def held_out_losses(model, batch, readers) -> dict:
    tokens, labels = batch["text"][:, :-1], batch["text"][:, 1:]
    out = {}
    model.eval()
    with torch.no_grad():
        for mode, mask in (("on", batch["neighbor_mask"]), ("off", torch.zeros_like(batch["neighbor_mask"]))):
            logits = model(tokens, batch["neighbor_tokens"], mask)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
            out[f"readers_{mode}"] = round(float(loss[readers].mean()), 4)
            out[f"all_{mode}"] = round(float(loss.mean()), 4)
    model.train()
    return out


def main(argv=None):
    args = parse_args(argv)
    ds = IndexedDataset(args.data_prefix)
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    if stream.max() >= args.vocab_size:
        raise SystemExit(f"error: {args.data_prefix}.bin holds token id {stream.max()} "
                         f">= --vocab-size {args.vocab_size}")
    batches = OracleBatches(stream, args)
    model, forward_step = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    train_g, held_g = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1)
    held, useful = batches(args.eval_samples, True, held_g)
    readers = reader_positions(useful, args.seq_length, args.retro_chunk_length)
    gates = [m for m in model.modules() if isinstance(m, TanhGate)]
    start = time.time()

    def log(step, loss):
        record = {"step": step, "train": loss, **held_out_losses(model, held, readers),
                  "tanh_gates": [round(float(torch.tanh(g.alpha.detach())), 4) for g in gates],
                  "elapsed_s": round(time.time() - start, 1)}
        print(json.dumps(record), flush=True)

    log(0, None)
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.lr / 10, warmup, args.steps, "cosine")
        loss, _ = forward_step(model, batches(args.batch_size, False, train_g)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_interval == 0 or step == args.steps:
            log(step, round(loss.item(), 4))

if __name__ == "__main__":
    main()

"""Evaluate a checkpoint of pretrain_retro.py on the validation split: retrieval on / off / random.

    python tools/retro/evaluate.py --retro-work-dir wd --load ckpt/retro [--ckpt-step N] [--output results.json]
    torchrun --nproc-per-node 4 tools/retro/evaluate.py ... --pipeline-model-parallel-size 2 \
        --tensor-model-parallel-size 2

The model, data and tokenizer come from the checkpoint's config; the work dir must match it.
Each mode is scored as validation during training is, on the first --eval-samples validation
samples (whole global batches): under torchrun with tensor / pipeline parallelism (any layout,
whatever the checkpoint was trained under; the pipeline runs its forward-only schedule) and
data parallelism over the remaining processes. Rank 0 prints and writes the JSON.
Prints and writes (with --output) JSON of this shape:

    {"step", "model": "retro" | "gpt", "num_samples",
     "retrieval_on": {"loss", "lm_loss", "ppl", "gate_mean"}, "retrieval_off": {...},
     "random_retrieval": {...}, "delta_lm_loss_off_minus_on", "delta_lm_loss_random_minus_on"}

Off = no neighbour reaches any chunked cross-attention; random = neighbours drawn uniformly from
the valid chunks of the DB, masked like the retrieved ones. A GPT checkpoint (trained without
--retro-add-retriever) has only "retrieval_off". gate_mean: with --retro-attention-gate the
mean per-chunk gate over the chunks with a real neighbour (as the budget loss sees it), so 0.0
with retrieval off; 1.0 without --retro-attention-gate.

--copy-probe adds "copy_probe" (megatron/training/copy_probe.py): lm loss on random tokens that
only copying predicts, from the model's own context and (RETRO) from a neighbour holding the text,
aligned or displaced. A model whose retrieval gain is zero and that cannot copy there has not
learnt the skill retrieval rests on; one that copies there but gains nothing has nothing to copy.

--overlap-buckets (RETRO paper §2.6, Fig. 6: is a gain modelling, or copying?) adds

    "overlap_ngram": 13,
    "overlap_buckets": {"0" | "<=20%" | "<=50%" | "<=80%" | ">80%":
                        {"chunks", "lm_loss_on", "lm_loss_off", "delta_lm_loss_off_minus_on",
                         "gate_mean"}}

For each whole chunk C_v (v >= 1) of each evaluated sample: the tokens of C_v are predicted by
the positions that read the neighbours of C_{v-1} (chunked cross-attention is shifted by one
chunk), so its overlap is the largest fraction of C_v's 13-grams of tokens found in any one of
those neighbours (chunk + continuation); its loss is the mean lm loss of predicting C_v's
tokens, with retrieval on and off; its gate is the gate of C_{v-1}, whose neighbours those
positions read (mean over retro layers; gate_mean of a bucket: over its chunks whose C_{v-1} has a
real neighbour, None if none has; 1.0 without --retro-attention-gate), so a reader sees whether
the gate opens where the neighbours hold the text. Bucket "0" holds overlap exactly 0, "<=20%"
(0, 0.2], and so on. Chunk 0 reads no neighbour and is left out.
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from megatron.data.loader import build_data_loader
from megatron.models.loss import LM_LOSS, next_token_loss, token_losses
from megatron.parallel.config import ParallelConfig
from megatron.parallel.parallelize import parallelize_fn
from megatron.parallel.ranks import is_distributed, rank_and_world_size
from megatron.retrieval.overlap import OVERLAP_BUCKETS, OVERLAP_NGRAM, bucket_of, chunk_overlaps
from megatron.training import retro_data, retro_step
from megatron.training.config import Config
from megatron.training.copy_probe import copy_probe
from megatron.training.host_memory import keep_freed_host_memory
from megatron.training.initialize import initialize_distributed
from megatron.training.retro_checkpoint import checkpoint_config, load_weights
from megatron.training.trainer import evaluate_dataset, sample_counts

MODES = {"retrieval_on": "on", "retrieval_off": "off", "random_retrieval": "random"}


@torch.no_grad()
def evaluate_overlap_buckets(model, cfg: Config, num_samples: int, device) -> dict:
    """Per-chunk lm loss with retrieval on and off and gate, grouped by the chunk's overlap with
    the neighbours it reads (see the module docstring)."""
    _, valid, _ = retro_data.datasets(cfg, sample_counts(cfg), retrieval="on", training=False)
    m = cfg.retro.model.chunk_length
    sums = {name: {"chunks": 0, "on": 0.0, "off": 0.0, "gated": 0, "gate": 0.0} for name, _ in OVERLAP_BUCKETS}
    mbs = cfg.training.micro_batch_size
    seen = 0
    for batch in build_data_loader(valid, mbs, 0):
        if seen + mbs > num_samples:
            break
        seen += mbs
        text = batch["text"].to(device)
        tokens, labels = text[:, :-1], text[:, 1:]
        nb, mask = batch["neighbor_tokens"].to(device), batch["neighbor_mask"].to(device)
        losses = {}
        for mode, mode_mask in (("off", torch.zeros_like(mask)), ("on", mask)):
            losses[mode] = token_losses(model(tokens, nb, mode_mask), labels)
        gates = retro_step.unwrap(model).chunk_gates()  # of the last forward, retrieval on
        real = mask.any(dim=-1)
        gates = real.float() if gates is None else gates[0]  # ungated: 1 wherever a neighbour is
        for i in range(len(text)):
            overlaps = chunk_overlaps(batch["text"][i].numpy(), batch["neighbor_tokens"][i].numpy(),
                                      batch["neighbor_mask"][i].numpy(), m)
            for v, overlap in enumerate(overlaps, start=1):
                # Positions v*m - 1 .. (v+1)*m - 2 predict the tokens of chunk v.
                bucket = sums[bucket_of(overlap)]
                bucket["chunks"] += 1
                for mode in ("on", "off"):
                    bucket[mode] += float(losses[mode][i, v * m - 1:(v + 1) * m - 1].mean())
                if real[i, v - 1]:
                    bucket["gated"] += 1
                    bucket["gate"] += float(gates[i, v - 1])
    out = {}
    for name, b in sums.items():
        on = b["on"] / b["chunks"] if b["chunks"] else None
        off = b["off"] / b["chunks"] if b["chunks"] else None
        out[name] = {"chunks": b["chunks"], "lm_loss_on": on, "lm_loss_off": off,
                     "delta_lm_loss_off_minus_on": None if on is None else off - on,
                     "gate_mean": b["gate"] / b["gated"] if b["gated"] else None}
    return out


def evaluate_mode(cfg: Config, env, par, mode: str, num_iters: int) -> dict:
    """Scores of the validation split's first ``num_iters`` global batches with neighbours `mode`."""
    _, valid, _ = retro_data.datasets(cfg, sample_counts(cfg), retrieval=mode, training=False)
    if valid is None:
        raise ValueError(f"--split {cfg.data.split} leaves no validation documents")
    metrics = evaluate_dataset(cfg, env, par, retro_step.make_forward_step(cfg), valid, num_iters,
                               loss_fn=next_token_loss, budget_loss_fn=retro_step.make_budget_loss_fn(cfg))
    lm = metrics[LM_LOSS]
    return {"loss": lm + metrics.get(retro_step.BUDGET_LOSS, 0.0), "lm_loss": lm, "ppl": math.exp(min(lm, 50.0)),
            "gate_mean": metrics.get(retro_step.GATE_MEAN, 1.0)}


def evaluate(load: str, work_dir: str, eval_samples: int | None = None, micro_batch_size: int | None = None,
             overlap_buckets: bool = False, parallel: dict | None = None, probe: bool = False,
             ckpt_step: int | None = None) -> dict:
    """The results dict (module docstring). ``parallel``: ParallelConfig fields for this run's
    layout (tensor / pipeline sizes; data parallel is the rest of the launched processes), which
    need not be the layout the checkpoint was trained under: DCP reshards on load. ``ckpt_step``:
    that iteration's checkpoint instead of the latest (learning curves)."""
    step, cfg = checkpoint_config(load, work_dir, ckpt_step)
    # Evaluation's own layout; recompute and compile only pay off in training.
    cfg.parallel = ParallelConfig(**(parallel or {}))
    cfg.training.recompute_granularity, cfg.training.use_torch_compile = None, False
    if micro_batch_size:
        cfg.training.micro_batch_size = micro_batch_size
    retro_data.prepare(cfg)
    env = initialize_distributed(cfg.parallel)
    if cfg.training.keep_freed_host_memory:
        keep_freed_host_memory(env.device)
    with torch.device(env.device):
        model = retro_step.model_provider(cfg)
    par = parallelize_fn(model, cfg, env)
    load_weights(load, par.model, step, cfg)
    par.model.eval()

    gbs = cfg.training.global_batch_size
    _, valid_count, _ = sample_counts(cfg)
    num_samples = min(eval_samples or cfg.training.eval_iters * gbs, valid_count)
    num_iters = num_samples // gbs
    if num_iters == 0:
        raise ValueError(f"{num_samples} validation samples are less than one global batch of {gbs} "
                         "(--eval-samples, or the run's --eval-iters x --global-batch-size)")

    add_retriever = cfg.retro.add_retriever
    results = {"step": step, "model": "retro" if add_retriever else "gpt", "num_samples": num_iters * gbs}
    modes = MODES if add_retriever else {"retrieval_off": "off"}
    for key, mode in modes.items():
        results[key] = evaluate_mode(cfg, env, par, mode, num_iters)
    if add_retriever:
        on = results["retrieval_on"]["lm_loss"]
        results["delta_lm_loss_off_minus_on"] = results["retrieval_off"]["lm_loss"] - on
        results["delta_lm_loss_random_minus_on"] = results["random_retrieval"]["lm_loss"] - on
        if overlap_buckets:
            if env.is_distributed:
                raise ValueError("--overlap-buckets scores chunk by chunk on one process: run it without torchrun")
            results["overlap_ngram"] = OVERLAP_NGRAM
            results["overlap_buckets"] = evaluate_overlap_buckets(par.model, cfg, results["num_samples"], env.device)
    elif overlap_buckets:
        raise ValueError(f"{load}: --overlap-buckets needs a RETRO checkpoint (this one is a GPT)")
    if probe:
        if env.is_distributed:
            raise ValueError("--copy-probe runs on one process: run it without torchrun")
        rcfg = cfg.retro.model
        results["copy_probe"] = copy_probe(
            par.model, cfg.model.vocab_size, cfg.model.seq_length,
            rcfg.chunk_length if add_retriever else None, rcfg.num_neighbors if add_retriever else None,
            device=env.device)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retro-work-dir", required=True)
    p.add_argument("--load", required=True, help="checkpoint directory written by pretrain_retro.py --save")
    p.add_argument("--ckpt-step", type=int, default=None,
                   help="evaluate this iteration's checkpoint (default: the latest)")
    p.add_argument("--output", default=None, help="write the JSON here too")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="validation samples per mode, rounded down to whole global batches (default: "
                        "--eval-iters x --global-batch-size of the run)")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--min-delta", type=float, default=retro_step.MIN_RETRIEVAL_GAIN,
                   help="warn when retrieval-off minus retrieval-on lm loss is below this")
    p.add_argument("--copy-probe", action="store_true",
                   help="also report whether the model copies random text from its context and from "
                        "neighbours (megatron/training/copy_probe.py)")
    p.add_argument("--overlap-buckets", action="store_true",
                   help="also report lm loss on/off by how much of each chunk its neighbours contain (13-grams)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    parallel = {"tensor_model_parallel_size": args.tensor_model_parallel_size,
                "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                "sequence_parallel": args.sequence_parallel}
    try:
        results = evaluate(args.load, args.retro_work_dir, args.eval_samples, args.micro_batch_size,
                           overlap_buckets=args.overlap_buckets, parallel=parallel, probe=args.copy_probe,
                           ckpt_step=args.ckpt_step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rank, _ = rank_and_world_size()
    if is_distributed():
        # Every rank past its last collective before any tears gloo down: a rank that left
        # early was seen to abort at exit (std::terminate) while the other still finished.
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.output)
    delta = results.get("delta_lm_loss_off_minus_on")
    if delta is not None and delta < args.min_delta:
        print(f"WARNING: retrieval-off minus retrieval-on lm loss is {delta:.4f} (< {args.min_delta}): "
              f"the model makes little use of its neighbours (a gate collapsed to closed?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

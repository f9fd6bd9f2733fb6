"""Where one training step's time goes, RETRO beside its same-size GPT, on CPU (torch.profiler).

Run: python benchmarks/profile_step.py [--sizes default 512] [--warmup 2] [--timed-steps 3]
        [--threads 2] [--trace-dir DIR] [the size flags of benchmarks/retro_vs_gpt.py]

The sizes, models and random batches are benchmarks/retro_vs_gpt.py's, so this explains its step
times. Each model trains through the trainer's own iteration (megatron/training/trainer.py):
Trainer.train_step, which takes the micro-batch from its Batches (DataLoader and collate, over
the batch's samples held in memory), runs forward_step of megatron/training/retro_step.py (forward,
LM loss), backward, grad-norm clipping, AdamW and the LR scheduler, and averages the metrics;
then Interval.add, the loop's per-step share of logging. After --warmup iterations one runs
under torch.profiler, and its self CPU time is summed per part:

  decoder self-attention  layers.N.attention and attention_norm (RoPE rotation included)
  decoder MLP             layers.N.mlp and mlp_norm
  encoder                 the retrieval encoder, layers.N.encoder
  CCA                     layers.N.cca, cca_norm, cca_gate (and gate)
  RoPE tables             rope_tables in the encoder and the CCA, GPTModel.rope
  masks                   masked_fill, any, ~, | ... called from model code, and their backward
  reshapes/copies         view, reshape, transpose, cat, pad, copy_, ... likewise
  embedding/output+loss   tok_embeddings (tokens and neighbours), final norm, output head, the LM loss (next_token_loss)
  optimizer step          AdamW's step and zero_grad, the LR scheduler
  grad-norm/clip          clip_grad_norm_
  data                    Batches.next
  metrics/logging         add_metrics, average (its .tolist()), Interval.add
  other                   the rest: residual adds, Python between ops, autograd's own work

Nothing is labelled inside the model: the benchmark wraps module forwards and a few functions in
record_function ranges from outside, for the profiled iteration only. A forward op belongs to the
innermost range around it; a backward op to the range of the forward op that created its
autograd node (the profiler's sequence numbers: the link torch's own backward stack traces use).
Reshape/copy and mask ops are told apart by the op that model code called (forward) or by their
autograd node (backward), whichever module they run in.

It also times, without the profiler, --timed-steps trainer iterations interleaved with as many
bare steps of the same model and optimizer (forward_step, backward, AdamW step, zero_grad): the
difference is the trainer's per-step overhead. The profiler adds overhead of its own, so read
the shares, not the milliseconds. Not a test: numbers depend on the machine.
"""

import argparse
import collections
import contextlib
import functools
import io
import os
import re
import statistics
import sys
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import megatron.models.retro.chunked_cross_attention
import megatron.models.retro.encoder
import megatron.training.retro_step
import megatron.training.trainer
from megatron.models.retro.model import RetroModel
from megatron.parallel.layout import DistEnv
from megatron.training.config import Config, TrainingConfig
from megatron.training.metrics import Interval
from megatron.training.retro_config import RetroTrainingConfig
from megatron.training.retro_step import make_forward_step
from megatron.training.trainer import Trainer
# benchmarks/retro_vs_gpt.py, beside this file (a script's directory is on sys.path).
from retro_vs_gpt import add_size_args, build_models, check_size, random_batch, sizes_from_args, timed_steps

LABEL = "profile_step: "
SELF_ATTENTION, MLP, ENCODER, CCA = "decoder self-attention", "decoder MLP", "encoder", "CCA"
ROPE, MASKS, COPIES, EMBED = "RoPE tables", "masks", "reshapes/copies", "embedding/output+loss"
OPTIMIZER, CLIP, DATA, METRICS, OTHER = "optimizer step", "grad-norm/clip", "data", "metrics/logging", "other"
PARTS = (SELF_ATTENTION, MLP, ENCODER, CCA, ROPE, MASKS, COPIES, EMBED, OPTIMIZER, CLIP, DATA, METRICS, OTHER)

# Module names of GPTModel / RetroModel and their parts; what runs inside the encoder stays the encoder's.
MODULE_PARTS = (
    (re.compile(r"layers\.\d+\.(attention|attention_norm)"), SELF_ATTENTION),
    (re.compile(r"layers\.\d+\.(mlp|mlp_norm)"), MLP),
    (re.compile(r"layers\.\d+\.encoder"), ENCODER),
    (re.compile(r"layers\.\d+\.(cca|cca_norm|cca_gate|gate)"), CCA),
    (re.compile(r"tok_embeddings|norm|output"), EMBED),
)
# Where an op's own kind (reshape/copy, mask) decides its part: in model code, not in RoPE
# tables, the optimizer or the trainer's bookkeeping.
KIND_DECIDES = {SELF_ATTENTION, MLP, ENCODER, CCA, EMBED, OTHER}
COPY_OPS = {"aten::" + op for op in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "t", "permute", "expand", "slice", "select", "narrow", "as_strided", "split", "unbind",
    "contiguous", "clone", "copy_", "to", "_to_copy", "type_as", "cat", "stack", "repeat", "pad",
    "constant_pad_nd", "zeros", "new_zeros")}
MASK_OPS = {"aten::" + op for op in (
    "masked_fill", "masked_fill_", "any", "all", "bitwise_not", "bitwise_or", "bitwise_and",
    "logical_not", "logical_or", "logical_and", "__or__", "__and__", "__invert__")}
# The autograd nodes those ops create: ViewBackward0, CatBackward0, ConstantPadNdBackward0, ...
COPY_NODE = re.compile(r"(View|UnsafeView|Reshape\w*|Flatten|Unflatten|Squeeze\w*|Unsqueeze\w*|Transpose|T|"
                       r"Permute|Expand|Slice|Select|Narrow|AsStrided\w*|Split\w*|Unbind|Clone|Copy\w*|ToCopy|"
                       r"Cat|Stack|Repeat|ConstantPadNd)Backward\d+")
MASK_NODE = re.compile(r"MaskedFill\w*Backward\d+")
BACKWARD_FUNCTION = 1  # the RecordScope of autograd nodes' ranges


def labelled(fn, part: str):
    """fn running inside a profiler range named after its part."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(LABEL + part):
            return fn(*args, **kwargs)
    return run


def module_labels(model: torch.nn.Module) -> list[tuple]:
    """(object, attribute, part) of the model's forwards to label, and of GPTModel.rope."""
    labels = [(model, "rope", ROPE)]
    for name, module in model.named_modules():
        for pattern, part in MODULE_PARTS:
            if pattern.fullmatch(name):
                labels.append((module, "forward", part))
    return labels


def trainer_labels(trainer: Trainer, interval: Interval) -> list[tuple]:
    """The functions the iteration calls outside the model, and RoPE tables built inside it."""
    return [
        (megatron.models.retro.encoder, "rope_tables", ROPE),
        (megatron.models.retro.chunked_cross_attention, "rope_tables", ROPE),
        (megatron.training.retro_step, "next_token_loss", EMBED),
        (torch.nn.utils, "clip_grad_norm_", CLIP),
        (megatron.training.trainer, "add_metrics", METRICS),
        (megatron.training.trainer, "average", METRICS),
        (interval, "add", METRICS),
        (trainer.train_batches, "next", DATA),
        (trainer.scheduler, "step", OPTIMIZER),
    ]


def profile_labelled(step, labels: list[tuple]) -> profile:
    """One call of `step` under the profiler, with `labels` in place for it only."""
    with contextlib.ExitStack() as stack:
        for target, attribute, part in labels:
            stack.enter_context(mock.patch.object(target, attribute, labelled(getattr(target, attribute), part)))
        with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(LABEL + OTHER):
            step()
    return prof


class _Samples(torch.utils.data.Dataset):
    """The samples of one batch, round and round: the loader's path without a work dir."""

    def __init__(self, batch: dict, length: int):
        b = next(iter(batch.values())).shape[0]
        self.samples = [{key: value[i].numpy() for key, value in batch.items()} for i in range(b)]
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.samples[i % len(self.samples)]


def trainer_for(model, cfg, rcfg, batch: dict, iterations: int) -> tuple[Trainer, Interval]:
    """The trainer for `model` on one process, built as pretrain builds it (its start-up lines
    silenced) on `batch`'s samples, and the log interval its iterations add to."""
    retro = isinstance(model, RetroModel)
    b = batch["text"].shape[0]
    config = Config(model=cfg, training=TrainingConfig(micro_batch_size=b, train_iters=iterations, lr=1e-4),
                    retro=RetroTrainingConfig(add_retriever=retro, model=rcfg))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    samples = _Samples(batch if retro else {"text": batch["text"]}, b * iterations)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, lambda _: model, make_forward_step(config), lambda *_: (samples, None, None),
                          env=env)
    interval = Interval(tokens_per_iteration=b * cfg.seq_length, flops_per_token=0.0, world_size=1, peak=None)
    return trainer, interval


def backward_node(event):
    """The autograd node whose backward an event runs in, or None in forward."""
    while event is not None:
        if event.scope == BACKWARD_FUNCTION:
            return event
        event = event.cpu_parent
    return None


def label_part(name: str) -> str | None:
    if name.startswith(LABEL):
        return name[len(LABEL):]
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):  # torch.optim's own ranges
        return OPTIMIZER
    return None


def forward_part(event) -> tuple[str, str]:
    """(part of the innermost labelled range around a forward event, name of the op called
    directly in that range that the event runs in; "" for the range itself)."""
    op = ""
    while event is not None:
        part = label_part(event.name)
        if part is not None:
            return part, op
        op, event = event.name, event.cpu_parent
    return OTHER, op


def attribute(prof: profile) -> tuple[dict[str, float], dict[str, float]]:
    """Self CPU microseconds of the profiled iteration per part, and per op of "other"."""
    events = [e for e in prof.events() if not e.is_async]
    top = next(e for e in events if e.name == LABEL + OTHER)
    events = [e for e in events if e.thread == top.thread
              and top.time_range.start <= e.time_range.start and e.time_range.end <= top.time_range.end]
    # Every op peeks the sequence number its autograd node would get, and the op that creates
    # node n is the last to start with n: later ops see n + 1.
    creators = {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.sequence_nr >= 0 and backward_node(e) is None and not e.name.startswith("autograd::engine"):
            creators[(e.sequence_nr, e.thread)] = forward_part(e)[0]
    parts, other = collections.Counter(), collections.Counter()
    for e in events:
        node = backward_node(e)
        if node is None:
            part, op = forward_part(e)
            if part in KIND_DECIDES and op in COPY_OPS:
                part = COPIES
            elif part in KIND_DECIDES and op in MASK_OPS:
                part = MASKS
            # The autograd engine's per-node ranges sit outside the nodes: its own work.
            key = ("autograd::engine::evaluate_function" if op.startswith("autograd::engine")
                   else op or "(Python between ops)")
        else:
            key = node.name.split(": ")[-1]
            part = (COPIES if COPY_NODE.fullmatch(key) else MASKS if MASK_NODE.fullmatch(key)
                    else creators.get((node.sequence_nr, node.fwd_thread), OTHER))
        parts[part] += e.self_cpu_time_total
        if part == OTHER:
            other[key] += e.self_cpu_time_total
    return parts, other


def profile_model(model, cfg, rcfg, batch: dict, args) -> dict:
    """Warm-up, interleaved timing of trainer iterations and bare steps, one profiled iteration."""
    trainer, interval = trainer_for(model, cfg, rcfg, batch, args.warmup + 2 * args.timed_steps + 2)

    def iteration():
        metrics, _, applied = trainer.train_step(trainer.train_batches)
        interval.add(metrics, 0.0, applied)

    def bare_step():
        loss, _ = trainer.forward_step(model, batch)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        iteration()
    bare_step()
    trainer_s, bare_s = [], []
    for _ in range(args.timed_steps):
        trainer_s.append(timed_steps(iteration, 1))
        bare_s.append(timed_steps(bare_step, 1))
    prof = profile_labelled(iteration, module_labels(model) + trainer_labels(trainer, interval))
    parts, other = attribute(prof)
    return {"trainer_s": statistics.median(trainer_s), "bare_s": statistics.median(bare_s),
            "parts": parts, "other": other, "prof": prof}


def report(size, results: dict[str, dict]):
    print()
    print(f"== size {size.name}: {size.describe()}")
    for name, r in results.items():
        overhead = r["trainer_s"] - r["bare_s"]
        print(f"{name}: trainer iteration {r['trainer_s']:.3f} s, bare fwd+bwd+AdamW {r['bare_s']:.3f} s "
              f"(medians, no profiler): trainer overhead {overhead * 1e3:+.1f} ms ({overhead / r['bare_s']:+.1%})")
    print(f"{'part':<24}" + "".join(f" {name + ' ms':>10} {'share':>6}" for name in results))
    totals = {name: sum(r["parts"].values()) for name, r in results.items()}
    for part in PARTS:
        print(f"{part:<24}" + "".join(f" {r['parts'][part] / 1e3:>10.1f} {r['parts'][part] / totals[name]:>6.1%}"
                                      for name, r in results.items()))
    print(f"{'profiled iteration':<24}" + "".join(f" {totals[name] / 1e3:>10.1f} {1:>6.0%}" for name in results))
    for name, r in results.items():
        largest = ", ".join(f"{op} {us / 1e3:.1f} ms" for op, us in r["other"].most_common(6))
        print(f"{name} other, largest: {largest}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(p)
    p.add_argument("--warmup", type=int, default=2, help="trainer iterations before anything is measured")
    p.add_argument("--timed-steps", type=int, default=3, help="trainer iterations and bare steps timed, each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trace-dir", default=None, help="also write each profile as a Chrome trace here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, {os.cpu_count()} CPUs visible")
    for size in sizes_from_args(args):
        check_size(size)
        cfg, rcfg, gpt, retro = build_models(size)
        batch = random_batch(size)
        results = {name: profile_model(model, cfg, rcfg, batch, args)
                   for name, model in (("GPT", gpt), ("RETRO", retro))}
        if args.trace_dir:
            os.makedirs(args.trace_dir, exist_ok=True)
            for name, r in results.items():
                r["prof"].export_chrome_trace(os.path.join(args.trace_dir, f"{size.name}_{name}.json"))
        report(size, results)


if __name__ == "__main__":
    main()

"""The pretraining loop shared by pretrain_gpt.py and pretrain_retro.py.

    pretrain(cfg, model_provider, forward_step, datasets_provider, flops_per_token=...)

- model_provider(cfg) -> nn.Module, built on this rank's device (it runs under
  `with torch.device(device)`); the trainer calls its `init_weights()` if it has one, then
  `post_init_fn(model, cfg)` if given (e.g. RETRO-fitting loads and freezes a GPT there),
  before the model is parallelized; the optimizer gets the parameters that require grad.
- forward_step(model, batch) -> (loss, metrics): `batch` is the loader's dict of tensors, already
  on the device; `loss` is the scalar to backpropagate; `metrics` maps names to scalar tensors
  (or floats) to log, e.g. {"lm loss": ...} or RETRO's {"lm loss": ..., "budget loss": ...}.
  Metrics are averaged over micro-batches, data-parallel ranks and the log interval.
- datasets_provider(cfg, (n_train, n_valid, n_test)) -> (train, valid, test) datasets (valid and
  test may be None) of at least that many samples; the counts follow Megatron (`sample_counts`).
- parallelize_fn(model, cfg, env) -> Parallelized: how the model is spread over the processes.
  The default, `data_parallel`, leaves it alone on one process and wraps it in DDP when launched
  with several; megatron/parallel provides the tensor/sequence/FSDP version.

One iteration = one optimizer step on the global batch: global_batch / (micro_batch * dp)
micro-batches per rank, gradients accumulated (synchronised across ranks only on the last).
On CPU in fp32 the loop is deterministic (dropout draws from the seeded RNG), and a run resumed
from a checkpoint continues with bit-identical losses: RNG states, optimizer, scheduler and data
position are all restored.
"""

import contextlib
import math
import time
from dataclasses import asdict, fields, is_dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron.data import builder
from megatron.data.batches import Batches
from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.loss import LM_LOSS
from megatron.parallel.layout import DistEnv, Parallelized, resolve_batch_sizes
from megatron.training.checkpointing import TrainState, load_checkpoint, save_checkpoint
from megatron.training.config import Config
from megatron.training.flops import mfu_peak
from megatron.training.initialize import initialize_distributed, pipeline_rank, set_random_seed
from megatron.training.logging import Writers, build_writers, format_train_line, format_validation_line
from megatron.training.lr_schedule import LRScheduler
from megatron.training.metrics import Interval, add_metrics, average
from megatron.training.optimizer import build_optimizer


def data_parallel(model: nn.Module, cfg: Config, env: DistEnv) -> Parallelized:
    """Default parallelize_fn: the bare model on one process, DDP over every rank otherwise."""
    p, t = cfg.parallel, cfg.training
    unsupported = [flag for flag, on in (
        ("--tensor-model-parallel-size > 1", p.tensor_model_parallel_size > 1),
        ("--pipeline-model-parallel-size > 1", p.pipeline_model_parallel_size > 1),
        ("--sequence-parallel", p.sequence_parallel),
        ("--data-parallel-type fsdp / --use-distributed-optimizer", p.data_parallel_type != "ddp"),
        ("--use-torch-compile", t.use_torch_compile),
        ("--recompute-activations / --recompute-granularity", t.recompute_granularity is not None),
    ) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: applied by megatron.parallel's parallelize_fn, "
                         f"not by the default data-parallel one")
    if env.world_size == 1:
        return Parallelized(model)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return Parallelized(ddp, dp_rank=env.rank, dp_size=env.world_size, dp_group=dist.group.WORLD)


def sample_counts(cfg: Config) -> tuple[int, int, int]:
    """This run's (train, valid, test) dataset sizes by Megatron's rule, which preprocessing
    follows too (`megatron.data.builder.sample_counts`)."""
    t = cfg.training
    return builder.sample_counts(None, t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters)


def _is_retro(cfg: Config) -> bool:
    """Whether this run builds a RETRO (pretrain_retro.py --retro-add-retriever); pretrain_gpt.py
    has no retro section."""
    retro = cfg.extra.get("retro")
    return bool(retro is not None and retro.add_retriever)


def _batches(dataset, cfg: Config, par: Parallelized, consumed: int, cyclic: bool, device: torch.device) -> Batches:
    """This rank's share of `dataset`'s micro-batches, as the run's sections set it up."""
    return Batches(dataset, micro_batch_size=cfg.training.micro_batch_size, consumed=consumed, dp_rank=par.dp_rank,
                   dp_size=par.dp_size, num_workers=cfg.data.num_workers, seed=cfg.training.seed, cyclic=cyclic,
                   device=device)


def _grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP and FSDP2 spell it differently)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


class _Trainer:
    def __init__(self, cfg: Config, env: DistEnv, par: Parallelized, forward_step: Callable,
                 optimizer, scheduler, num_micro: int):
        self.cfg, self.env, self.par, self.forward_step = cfg, env, par, forward_step
        self.model = par.model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.num_micro = num_micro
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = lambda: torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.training.bf16)

    def _pipelined_batch(self, batches: Batches) -> dict:
        """This rank's micro-batches of one iteration as one batch; the schedule splits it again."""
        micro = [batches.next() for _ in range(self.num_micro)]
        return {k: torch.cat([m[k] for m in micro]) for k in micro[0]}

    def train_step(self, batches: Batches) -> tuple[dict[str, float], float, bool]:
        """One optimizer step; returns (metrics, grad norm, whether the update was applied)."""
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.training.clip_grad
        max_norm = clip if clip > 0 else math.inf
        sums = {}
        pipe = self.par.pipeline
        if pipe is not None:
            with self.autocast():
                sums, count = pipe.train_step(self._pipelined_batch(batches)), 1
            grad_norm = pipe.clip_grad_norm_(max_norm)
        else:
            for i in range(self.num_micro):
                batch = batches.next()
                with _grad_sync(self.model, i == self.num_micro - 1), self.par.loss_context():
                    with self.autocast():
                        loss, metrics = self.forward_step(self.model, batch)
                    (loss / self.num_micro).backward()
                add_metrics(sums, metrics)
            count = self.num_micro
            grad_norm = nn.utils.clip_grad_norm_(self.params, max_norm=max_norm)
            if hasattr(grad_norm, "full_tensor"):  # DTensor parameters give a DTensor norm
                grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return average(sums, count, self.par), grad_norm, applied

    @torch.no_grad()
    def evaluate(self, batches: Batches, eval_iters: int) -> dict[str, float]:
        self.model.eval()
        sums = {}
        pipe = self.par.pipeline
        for _ in range(eval_iters if pipe is not None else eval_iters * self.num_micro):
            with self.autocast():
                if pipe is not None:  # forward-only schedule over the iteration's micro-batches
                    metrics = pipe.eval_step(self._pipelined_batch(batches))
                else:
                    with self.par.loss_context():
                        _, metrics = self.forward_step(self.model, batches.next())
            add_metrics(sums, metrics)
        self.model.train()
        return average(sums, eval_iters if pipe is not None else eval_iters * self.num_micro, self.par)


def evaluate_dataset(cfg: Config, env: DistEnv, par: Parallelized, forward_step: Callable, dataset,
                     num_iters: int) -> dict[str, float]:
    """Metrics averaged over the first ``num_iters`` global batches of ``dataset``, computed as
    validation during training is (each data-parallel rank its slice, the pipeline's forward-only
    schedule under pipeline parallelism, vocabulary-parallel loss under TP): for tools that
    evaluate a loaded checkpoint, such as tools/retro/evaluate.py."""
    num_micro = resolve_batch_sizes(cfg, par.dp_size)
    trainer = _Trainer(cfg, env, par, forward_step, optimizer=None, scheduler=None, num_micro=num_micro)
    return trainer.evaluate(_batches(dataset, cfg, par, 0, cyclic=False, device=env.device), num_iters)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_config(cfg: Config):
    print("------------------------ arguments ------------------------", flush=True)
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        items = asdict(value).items() if section.name != "extra" else (
            (k, asdict(v) if is_dataclass(v) else v) for k, v in value.items())
        for name, v in items:
            print(f"  {section.name}.{name} {'.' * max(1, 40 - len(section.name) - len(name))} {v}")
    print("-------------------- end of arguments ---------------------", flush=True)


def pretrain(cfg: Config, model_provider: Callable, forward_step: Callable, datasets_provider: Callable, *,
             flops_per_token: float | None = None, parallelize_fn: Callable = data_parallel,
             env: DistEnv | None = None, post_init_fn: Callable | None = None) -> dict:
    """Train as `cfg` says; returns a summary for scripts and tests:

    {"iteration", "consumed_train_samples", "train_loss" (lm loss of the last iteration),
    "validation_loss" (of the last evaluation; None if none ran), "train_history": [(iteration,
    metrics averaged over the log interval)] at every log line, "validation_history": [(iteration, metrics)]}.
    flops_per_token: training FLOPs per token for TFLOP/s and MFU (default: the GPT formula).
    """
    env = env or initialize_distributed(cfg.parallel)
    say = (lambda msg: print(msg, flush=True)) if env.is_last_rank else (lambda msg: None)
    t, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    pp = cfg.parallel.pipeline_model_parallel_size
    # Every pipeline rank builds the same full model (its stages are cut from it, and copies of
    # shared weights must start equal); Megatron's per-stage seeds apply from then on (dropout).
    set_random_seed(t.seed)
    if flops_per_token is None:
        flops_per_token = gpt_flops_per_token(cfg.model)

    with torch.device(env.device):
        model = model_provider(cfg)
    if hasattr(model, "init_weights"):
        # Reseeded: construction drew from the generator too, as many times as the model has
        # parameters, so a RETRO would otherwise start from other decoder weights than its GPT.
        set_random_seed(t.seed)
        model.init_weights()
    if pp > 1:
        set_random_seed(t.seed, pipeline_rank(env, pp))
    if post_init_fn is not None:
        post_init_fn(model, cfg)
    num_params = sum(p.numel() for p in model.parameters())
    par = parallelize_fn(model, cfg, env)
    num_micro = resolve_batch_sizes(cfg, par.dp_size)
    gbs = t.global_batch_size
    if env.is_last_rank:
        _print_config(cfg)
    say(f" > number of parameters: {num_params} on {env.world_size} process(es), device {env.device}, "
        f"data-parallel size {par.dp_size}, {num_micro} micro-batch(es) per iteration")
    config_dict = asdict(cfg)
    # Before the optimizer and the data, so that a missing wandb package fails the run early.
    writers = build_writers(lg, ck.save, config_dict) if env.is_last_rank else Writers([])

    optimizer = build_optimizer(par.model, t)
    scheduler = LRScheduler(optimizer, t)
    state = TrainState()
    if ck.load:
        loaded = load_checkpoint(ck.load, par.model, optimizer, scheduler, step=ck.ckpt_step,
                                 load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                                 model_config=asdict(cfg.model), add_retriever=_is_retro(cfg))
        if loaded is None:
            say(f"WARNING: no checkpoint found in {ck.load}; training from scratch")
        else:
            state = loaded
            say(f" > loaded checkpoint from {ck.load} at iteration {state.iteration} "
                f"(consumed samples: {state.consumed_train_samples})")

    say(" > building train, validation, and test datasets ...")
    counts = sample_counts(cfg)
    train_ds, valid_ds, _ = datasets_provider(cfg, counts)
    if train_ds is None:
        raise ValueError(f"no training data: --split {cfg.data.split} leaves the train split empty")
    train_batches = _batches(train_ds, cfg, par, state.consumed_train_samples, cyclic=False, device=env.device)
    do_eval = valid_ds is not None and t.eval_iters > 0
    valid_batches = _batches(valid_ds, cfg, par, state.consumed_valid_samples % len(valid_ds), cyclic=True,
                             device=env.device) if do_eval else None

    peak = None
    if env.is_last_rank:
        peak, peak_line = mfu_peak(env.device, torch.bfloat16 if t.bf16 else torch.float32, lg.peak_tflops)
        if peak_line:
            say(peak_line)

    trainer = _Trainer(cfg, env, par, forward_step, optimizer, scheduler, num_micro)
    interval = Interval(tokens_per_iteration=gbs * cfg.model.seq_length, flops_per_token=flops_per_token,
                         world_size=env.world_size, peak=peak)
    train_history, validation_history, last_metrics = [], [], {}
    last_saved = last_evaluated = state.iteration

    def save():
        nonlocal last_saved
        # Megatron's line before the save too: a run killed while saving says where it was.
        say(f"saving checkpoint at iteration {state.iteration:7d} to {ck.save}")
        save_checkpoint(ck.save, state, par.model, optimizer, scheduler, config_dict, keep_last_n=ck.keep_last_n)
        last_saved = state.iteration
        say(f"  successfully saved checkpoint at iteration {state.iteration:7d} to {ck.save}")

    def validate(suffix: str = ""):
        nonlocal last_evaluated
        metrics = trainer.evaluate(valid_batches, t.eval_iters)
        state.consumed_valid_samples += t.eval_iters * gbs
        last_evaluated = state.iteration
        validation_history.append((state.iteration, metrics))
        line = format_validation_line(state.iteration, metrics, LM_LOSS, suffix)
        say("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        writers.validation(state.iteration, state.consumed_train_samples, metrics, LM_LOSS)

    say(" > training ...")
    par.model.train()
    while state.iteration < t.train_iters:
        lr = scheduler.current_lr()
        _sync(env.device)  # time the step alone, not work queued before it
        start = time.perf_counter()
        last_metrics, grad_norm, applied = trainer.train_step(train_batches)
        _sync(env.device)
        interval.add(last_metrics, time.perf_counter() - start, applied)
        state.iteration += 1
        state.consumed_train_samples += gbs

        if state.iteration % lg.log_interval == 0:
            averaged, throughput = interval.close()
            train_history.append((state.iteration, averaged))
            line = format_train_line(
                iteration=state.iteration, train_iters=t.train_iters, consumed_samples=state.consumed_train_samples,
                elapsed_ms=throughput["elapsed_ms"], learning_rate=lr, global_batch_size=gbs, metrics=averaged,
                grad_norm=grad_norm, skipped_iterations=throughput["skipped"], nan_iterations=throughput["nan"],
                tokens_per_second=throughput["tokens_per_second"], tflops_per_device=throughput["tflops_per_device"],
                mfu=throughput["mfu"])
            # After Megatron's fields, so its parsers still read the line.
            say(line + f" {throughput['peak_note']} |" if throughput["peak_note"] else line)
            writers.train(state.iteration, state.consumed_train_samples, lr, averaged, grad_norm,
                          throughput["tokens_per_second"], throughput["tflops_per_device"], throughput["mfu"])

        if do_eval and state.iteration % t.eval_interval == 0:
            validate()
        if ck.save and ck.save_interval and state.iteration % ck.save_interval == 0:
            save()
        if t.exit_interval and state.iteration % t.exit_interval == 0:
            say(f" > exiting at iteration {state.iteration} (--exit-interval {t.exit_interval})")
            break

    if ck.save and last_saved != state.iteration:
        save()
    if do_eval and last_evaluated != state.iteration:
        validate(" on validation set")
    writers.close()

    last_valid = validation_history[-1][1] if validation_history else {}
    return {
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "train_loss": last_metrics.get(LM_LOSS),
        "validation_loss": last_valid.get(LM_LOSS),
        "train_history": train_history,
        "validation_history": validation_history,
    }

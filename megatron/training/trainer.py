"""The pretraining loop shared by pretrain_gpt.py and pretrain_retro.py.

    pretrain(cfg, model_provider, forward_step, datasets_provider, flops_per_token=...)

builds a `Trainer` (its __init__: seed, model, parallelism, optimizer, checkpoint, data) and runs
its `train` loop; `evaluate_dataset` evaluates a loaded model the way validation does.

- model_provider(cfg) -> nn.Module, built on this rank's device (it runs under
  `with torch.device(device)`); the trainer calls its `init_weights()` if it has one, then
  `post_init_fn(model, cfg)` if given (e.g. RETRO-fitting loads and freezes a GPT there),
  before the model is parallelized; the optimizer gets the parameters that require grad.
- forward_step(model, batch) -> (loss, metrics): `batch` is the loader's dict of tensors, already
  on the device; `loss` is the scalar to backpropagate; `metrics` maps names to scalar tensors
  (or floats) to log, e.g. {"lm loss": ...} or RETRO's {"lm loss": ..., "budget loss": ...}.
  Metrics are averaged over micro-batches, data-parallel ranks and the log interval.
- loss_fn(logits, batch) -> (loss, metrics): forward_step's part after the model (e.g.
  `megatron.models.loss.next_token_loss`), and budget_loss_fn(gate mean) -> loss (RETRO's budget on its gates, which
  forward_step adds; None: none): under pipeline parallelism no process runs the whole model, and
  the pipeline runs these on its stages instead of forward_step (loss_fn is then required).
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
from dataclasses import asdict, fields
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
from megatron.training.host_memory import keep_freed_host_memory
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
    return cfg.retro is not None and cfg.retro.add_retriever


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


def _autocast(cfg: Config, env: DistEnv):
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.training.bf16)


def _iteration_batch(batches: Batches, num_micro: int) -> dict:
    """This rank's micro-batches of one iteration as one batch; the pipeline's schedule splits it again."""
    micro = [batches.next() for _ in range(num_micro)]
    return {k: torch.cat([m[k] for m in micro]) for k in micro[0]}


@torch.no_grad()
def _evaluate(cfg: Config, env: DistEnv, par: Parallelized, forward_step: Callable, batches: Batches,
              num_iters: int, loss_fn: Callable | None, budget_loss_fn: Callable | None) -> dict[str, float]:
    """Metrics averaged over `num_iters` iterations' micro-batches of `batches`, forward only."""
    num_micro = resolve_batch_sizes(cfg, par.dp_size)
    pipe = par.pipeline
    steps = num_iters if pipe is not None else num_iters * num_micro
    par.model.eval()
    sums = {}
    for _ in range(steps):
        with _autocast(cfg, env):
            if pipe is not None:  # forward-only schedule over the iteration's micro-batches
                metrics = pipe.eval_step(_iteration_batch(batches, num_micro), loss_fn, budget_loss_fn)
            else:
                with par.loss_context():
                    _, metrics = forward_step(par.model, batches.next())
        add_metrics(sums, metrics)
    par.model.train()
    return average(sums, steps, par)


def evaluate_dataset(cfg: Config, env: DistEnv, par: Parallelized, forward_step: Callable, dataset,
                     num_iters: int, *, loss_fn: Callable | None = None,
                     budget_loss_fn: Callable | None = None) -> dict[str, float]:
    """Metrics averaged over the first ``num_iters`` global batches of ``dataset``, computed as
    validation during training is (each data-parallel rank its slice, the pipeline's forward-only
    schedule with loss_fn and budget_loss_fn under pipeline parallelism, vocabulary-parallel loss
    under TP): for tools that evaluate a loaded checkpoint, such as tools/retro/evaluate.py."""
    return _evaluate(cfg, env, par, forward_step, _batches(dataset, cfg, par, 0, cyclic=False, device=env.device),
                     num_iters, loss_fn, budget_loss_fn)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_config(cfg: Config):
    print("------------------------ arguments ------------------------", flush=True)
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        if value is None:  # a feature's section this run has not (pretrain_gpt.py's retro)
            continue
        for name, v in asdict(value).items():
            print(f"  {section.name}.{name} {'.' * max(1, 40 - len(section.name) - len(name))} {v}")
    print("-------------------- end of arguments ---------------------", flush=True)


class Trainer:
    """One run as `cfg` says: __init__ builds it (seed, model and its weights, post_init_fn,
    parallelism, optimizer, scheduler, checkpoint, data) in that order, which the RNG streams and
    the log lines follow; `train` runs the loop. The arguments are pretrain's."""

    def __init__(self, cfg: Config, model_provider: Callable, forward_step: Callable, datasets_provider: Callable, *,
                 loss_fn: Callable | None = None, budget_loss_fn: Callable | None = None,
                 flops_per_token: float | None = None, parallelize_fn: Callable = data_parallel,
                 env: DistEnv | None = None, post_init_fn: Callable | None = None):
        self.cfg, self.forward_step = cfg, forward_step
        self.loss_fn, self.budget_loss_fn = loss_fn, budget_loss_fn
        self.env = env or initialize_distributed(cfg.parallel)
        if cfg.training.keep_freed_host_memory:
            keep_freed_host_memory(self.env.device)
        self.flops_per_token = gpt_flops_per_token(cfg.model) if flops_per_token is None else flops_per_token
        model = self._build_model(model_provider, post_init_fn)
        num_params = sum(p.numel() for p in model.parameters())
        self.par = parallelize_fn(model, cfg, self.env)
        if self.par.pipeline is not None and loss_fn is None:
            raise ValueError("pipeline parallelism runs the model stage by stage, not forward_step: pass "
                             "pretrain(..., loss_fn=...), the loss forward_step takes of the logits")
        self.num_micro = resolve_batch_sizes(cfg, self.par.dp_size)
        self._announce(num_params)
        self.config_dict = asdict(cfg)
        # Before the optimizer and the data, so that a missing wandb package fails the run early.
        self.writers = build_writers(cfg.logging, cfg.checkpoint.save, self.config_dict) \
            if self.env.is_last_rank else Writers([])
        self.optimizer = build_optimizer(self.par.model, cfg.training)
        self.scheduler = LRScheduler(self.optimizer, cfg.training)
        self.state = self._load()
        self.params = [p for p in self.par.model.parameters() if p.requires_grad]
        self.train_batches, self.valid_batches = self._build_data(datasets_provider)
        self.train_history, self.validation_history = [], []
        self.last_saved = self.last_evaluated = self.state.iteration

    def _say(self, msg: str):
        if self.env.is_last_rank:
            print(msg, flush=True)

    def _build_model(self, model_provider: Callable, post_init_fn: Callable | None) -> nn.Module:
        seed, pp = self.cfg.training.seed, self.cfg.parallel.pipeline_model_parallel_size
        # Every pipeline rank builds the same full model (its stages are cut from it, and copies of
        # shared weights must start equal); Megatron's per-stage seeds apply from then on (dropout).
        set_random_seed(seed)
        with torch.device(self.env.device):
            model = model_provider(self.cfg)
        if hasattr(model, "init_weights"):
            # Reseeded: construction drew from the generator too, as many times as the model has
            # parameters, so a RETRO would otherwise start from other decoder weights than its GPT.
            set_random_seed(seed)
            model.init_weights()
        if pp > 1:
            set_random_seed(seed, pipeline_rank(self.env, pp))
        if post_init_fn is not None:
            post_init_fn(model, self.cfg)
        return model

    def _announce(self, num_params: int):
        if self.env.is_last_rank:
            _print_config(self.cfg)
        self._say(f" > number of parameters: {num_params} on {self.env.world_size} process(es), device "
                  f"{self.env.device}, data-parallel size {self.par.dp_size}, {self.num_micro} micro-batch(es) "
                  f"per iteration")

    def _load(self) -> TrainState:
        """The checkpoint's state (the model, optimizer, scheduler and RNG streams restored), or a fresh one."""
        ck = self.cfg.checkpoint
        if not ck.load:
            return TrainState()
        loaded = load_checkpoint(ck.load, self.par.model, self.optimizer, self.scheduler, step=ck.ckpt_step,
                                 load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                                 model_config=asdict(self.cfg.model), add_retriever=_is_retro(self.cfg))
        if loaded is None:
            self._say(f"WARNING: no checkpoint found in {ck.load}; training from scratch")
            return TrainState()
        self._say(f" > loaded checkpoint from {ck.load} at iteration {loaded.iteration} "
                  f"(consumed samples: {loaded.consumed_train_samples})")
        return loaded

    def _build_data(self, datasets_provider: Callable) -> tuple[Batches, Batches | None]:
        """Train batches from the first sample not trained on; validation batches (None when there
        is no validation) continue where the last evaluation stopped."""
        t = self.cfg.training
        self._say(" > building train, validation, and test datasets ...")
        train_ds, valid_ds, _ = datasets_provider(self.cfg, sample_counts(self.cfg))
        if train_ds is None:
            raise ValueError(f"no training data: --split {self.cfg.data.split} leaves the train split empty")
        train = _batches(train_ds, self.cfg, self.par, self.state.consumed_train_samples, cyclic=False,
                         device=self.env.device)
        if valid_ds is None or t.eval_iters <= 0:
            return train, None
        return train, _batches(valid_ds, self.cfg, self.par, self.state.consumed_valid_samples % len(valid_ds),
                               cyclic=True, device=self.env.device)

    def train_step(self, batches: Batches) -> tuple[dict[str, float], float, bool]:
        """One optimizer step; returns (metrics, grad norm, whether the update was applied)."""
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.training.clip_grad
        max_norm = clip if clip > 0 else math.inf
        pipe = self.par.pipeline
        if pipe is not None:
            with _autocast(self.cfg, self.env):
                batch = _iteration_batch(batches, self.num_micro)
                sums, count = pipe.train_step(batch, self.loss_fn, self.budget_loss_fn), 1
            grad_norm = pipe.clip_grad_norm_(max_norm)
        else:
            sums, count = self._forward_backward(batches), self.num_micro
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

    def _forward_backward(self, batches: Batches) -> dict:
        """Gradients of one iteration's micro-batches, accumulated; returns their metrics' sums."""
        model, sums = self.par.model, {}
        for i in range(self.num_micro):
            batch = batches.next()
            with _grad_sync(model, i == self.num_micro - 1), self.par.loss_context():
                with _autocast(self.cfg, self.env):
                    loss, metrics = self.forward_step(model, batch)
                (loss / self.num_micro).backward()
            add_metrics(sums, metrics)
        return sums

    def validate(self, suffix: str = ""):
        t, state = self.cfg.training, self.state
        metrics = _evaluate(self.cfg, self.env, self.par, self.forward_step, self.valid_batches, t.eval_iters,
                            self.loss_fn, self.budget_loss_fn)
        state.consumed_valid_samples += t.eval_iters * t.global_batch_size
        self.last_evaluated = state.iteration
        self.validation_history.append((state.iteration, metrics))
        line = format_validation_line(state.iteration, metrics, LM_LOSS, suffix)
        self._say("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self.writers.validation(state.iteration, state.consumed_train_samples, metrics, LM_LOSS)

    def save(self):
        ck, iteration = self.cfg.checkpoint, self.state.iteration
        # Megatron's line before the save too: a run killed while saving says where it was.
        self._say(f"saving checkpoint at iteration {iteration:7d} to {ck.save}")
        save_checkpoint(ck.save, self.state, self.par.model, self.optimizer, self.scheduler, self.config_dict,
                        keep_last_n=ck.keep_last_n)
        self.last_saved = iteration
        self._say(f"  successfully saved checkpoint at iteration {iteration:7d} to {ck.save}")

    def log(self, interval: Interval, learning_rate: float, grad_norm: float):
        """The log interval's line, and its scalars for TensorBoard/wandb."""
        t, state = self.cfg.training, self.state
        averaged, throughput = interval.close()
        self.train_history.append((state.iteration, averaged))
        line = format_train_line(
            iteration=state.iteration, train_iters=t.train_iters, consumed_samples=state.consumed_train_samples,
            elapsed_ms=throughput["elapsed_ms"], learning_rate=learning_rate, global_batch_size=t.global_batch_size,
            metrics=averaged, grad_norm=grad_norm, skipped_iterations=throughput["skipped"],
            nan_iterations=throughput["nan"], tokens_per_second=throughput["tokens_per_second"],
            tflops_per_device=throughput["tflops_per_device"], mfu=throughput["mfu"])
        # After Megatron's fields, so its parsers still read the line.
        self._say(line + f" {throughput['peak_note']} |" if throughput["peak_note"] else line)
        self.writers.train(state.iteration, state.consumed_train_samples, learning_rate, averaged, grad_norm,
                           throughput["tokens_per_second"], throughput["tflops_per_device"], throughput["mfu"])

    def _interval(self) -> Interval:
        """The log interval's accounting; MFU on the last rank only, the one that logs."""
        t, peak = self.cfg.training, None
        if self.env.is_last_rank:
            dtype = torch.bfloat16 if t.bf16 else torch.float32
            peak, peak_line = mfu_peak(self.env.device, dtype, self.cfg.logging.peak_tflops)
            if peak_line:
                self._say(peak_line)
        return Interval(tokens_per_iteration=t.global_batch_size * self.cfg.model.seq_length,
                        flops_per_token=self.flops_per_token, world_size=self.env.world_size, peak=peak)

    def _iteration(self, interval: Interval) -> dict[str, float]:
        """One train step, then what falls due at its end: log line, validation, checkpoint."""
        t, ck, state = self.cfg.training, self.cfg.checkpoint, self.state
        learning_rate = self.scheduler.current_lr()
        _sync(self.env.device)  # time the step alone, not work queued before it
        start = time.perf_counter()
        metrics, grad_norm, applied = self.train_step(self.train_batches)
        _sync(self.env.device)
        interval.add(metrics, time.perf_counter() - start, applied)
        state.iteration += 1
        state.consumed_train_samples += t.global_batch_size
        if state.iteration % self.cfg.logging.log_interval == 0:
            self.log(interval, learning_rate, grad_norm)
        if self.valid_batches is not None and state.iteration % t.eval_interval == 0:
            self.validate()
        if ck.save and ck.save_interval and state.iteration % ck.save_interval == 0:
            self.save()
        return metrics

    def train(self) -> dict:
        """Up to --train-iters (or --exit-interval), then a last checkpoint and validation where the
        loop's last iteration had none; returns pretrain's summary."""
        t, ck = self.cfg.training, self.cfg.checkpoint
        interval = self._interval()
        self._say(" > training ...")
        self.par.model.train()
        last_metrics = {}
        while self.state.iteration < t.train_iters:
            last_metrics = self._iteration(interval)
            if t.exit_interval and self.state.iteration % t.exit_interval == 0:
                self._say(f" > exiting at iteration {self.state.iteration} (--exit-interval {t.exit_interval})")
                break
        if ck.save and self.last_saved != self.state.iteration:
            self.save()
        if self.valid_batches is not None and self.last_evaluated != self.state.iteration:
            self.validate(" on validation set")
        self.writers.close()
        return self._summary(last_metrics)

    def _summary(self, last_metrics: dict[str, float]) -> dict:
        last_valid = self.validation_history[-1][1] if self.validation_history else {}
        return {
            "iteration": self.state.iteration,
            "consumed_train_samples": self.state.consumed_train_samples,
            "train_loss": last_metrics.get(LM_LOSS),
            "validation_loss": last_valid.get(LM_LOSS),
            "train_history": self.train_history,
            "validation_history": self.validation_history,
        }


def pretrain(cfg: Config, model_provider: Callable, forward_step: Callable, datasets_provider: Callable, *,
             loss_fn: Callable | None = None, budget_loss_fn: Callable | None = None,
             flops_per_token: float | None = None, parallelize_fn: Callable = data_parallel,
             env: DistEnv | None = None, post_init_fn: Callable | None = None) -> dict:
    """Train as `cfg` says; returns a summary for scripts and tests:

    {"iteration", "consumed_train_samples", "train_loss" (lm loss of the last iteration),
    "validation_loss" (of the last evaluation; None if none ran), "train_history": [(iteration,
    metrics averaged over the log interval)] at every log line, "validation_history": [(iteration, metrics)]}.
    flops_per_token: training FLOPs per token for TFLOP/s and MFU (default: the GPT formula).
    """
    return Trainer(cfg, model_provider, forward_step, datasets_provider, loss_fn=loss_fn,
                   budget_loss_fn=budget_loss_fn, flops_per_token=flops_per_token, parallelize_fn=parallelize_fn,
                   env=env, post_init_fn=post_init_fn).train()

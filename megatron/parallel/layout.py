"""How a run is laid out over its processes, as the trainer and the parallelize functions
(megatron/parallel/parallelize.py, pipeline.py) both see it: this process's place (`DistEnv`),
the model as spread over the processes (`Parallelized`), and the micro-batches each rank runs
per iteration (`resolve_batch_sizes`)."""

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from megatron.parallel.config import ParallelConfig
from megatron.transformer.config import ModelConfig


class TrainingSection(Protocol):
    """The fields of training's TrainingConfig that the parallel layer reads."""
    micro_batch_size: int
    global_batch_size: int | None
    bf16: bool
    recompute_granularity: str | None
    use_torch_compile: bool


class RunConfig(Protocol):
    """The run's Config (megatron/training/config.py) as the parallel layer reads it: a Protocol,
    so that parallel/ names what it needs without importing training/, which builds on it. Its
    sections are read-only members, so that Config's own section types fit them."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def training(self) -> TrainingSection: ...

    @property
    def parallel(self) -> ParallelConfig: ...


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was initialised

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_last_rank(self) -> bool:
        # Megatron prints from the last rank: it is in the last pipeline stage, where losses live.
        return self.rank == self.world_size - 1


@dataclass
class Parallelized:
    """The model as the loop drives it, and the data-parallel group it was spread over."""
    model: nn.Module
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None  # process group over which metrics are averaged; None when dp_size is 1
    # megatron.parallel.pipeline.PipelinedModel under --pipeline-model-parallel-size > 1: it runs
    # the micro-batches through its schedule (the entry point's loss_fn and gate budget) instead
    # of forward_step.
    pipeline: Any = None
    # The context forward_step and its backward run in: loss_parallel() when the model returns
    # vocabulary-sharded logits under tensor parallelism.
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def resolve_batch_sizes(cfg: RunConfig, dp_size: int) -> int:
    """Fills in the global batch size; returns the number of micro-batches per iteration (and
    rank). Idempotent: a pipelined parallelize_fn calls it too, to build its schedule."""
    t = cfg.training
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size is None:
        t.global_batch_size = per_step
    if t.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {t.global_batch_size} is not a multiple of --micro-batch-size "
                         f"{t.micro_batch_size} x data-parallel size {dp_size}")
    return t.global_batch_size // per_step

"""Pipeline parallelism for GPTModel and RetroModel with ``torch.distributed.pipelining``.

The model is cut at layer boundaries into ``pp x V`` stages (V virtual stages per rank for the
interleaved schedule; stage s runs on pipeline rank s % pp). A stage is the model itself with
the other stages' parts pruned (its forward runs what it holds, models/gpt/model.py): the
token embedding lives on the first stage, the final norm, head and loss on the last. What
travels between stages:

- GPT: the hidden states.
- RETRO, up to the stage holding the first retro layer (the retrieval encoder): the hidden
  states only. From that stage on: (hidden states, encoded neighbours); the encoded neighbours
  carry gradient, so every later chunked cross-attention's gradient flows back, summed by
  autograd, to the stage that owns the encoder. A pre-hook hands them to RetroModel.forward
  by keyword.

The neighbour token ids and mask never travel: they are keyword arguments of ``schedule.step``
on every rank (each rank loads its data-parallel slice of the batch anyway), and so are the
decoder's token ids (``token_ids``: the rope's length under sequence parallel, and RETRO's
gates compare each chunk with its neighbours). Why not
pass them from stage to stage: in torch 2.13's dynamic mode, shape inference runs a later stage on
``torch.empty`` tensors built from the previous stage's output metadata, so int64 ids coming
from a previous stage are garbage and the embedding lookup crashes; keyword arguments are run
on the real tensors. The alternative, static ``input_args``/``output_args`` on every stage,
would have to predict each stage's shapes (encoder width, partial last chunk, last micro-batch)
by hand. With keywords nothing is predicted, and no int64 tensors cross the wire.

Parameters used by several stages (the token embedding: first stage, the encoder's stage which
embeds the neighbours, and the head when tied) have a copy on each pipeline rank that needs it;
their gradients are summed over those ranks after backward, so the copies take identical
optimizer steps (Megatron's embedding group). The gradient norm counts them once.

Each rank's model (``PipelinedModel.model``) is the full model with the layers and modules of
other ranks removed, so its parameter names are the full model's: DCP checkpoints written under
any pipeline layout load under any other (each rank reads the names it has).

The rank's model is parallelized by megatron.parallel.parallelize.parallelize_model, in its
order for every layout: tensor (+sequence) parallel (each rank's share of the TP plan;
activations between stages stay plain tensors, under SP this rank's sequence shard; the last
stage's loss runs under ``loss_parallel()`` on vocabulary-sharded logits), recompute and compile
per block, then data parallel: FSDP2 (``fully_shard`` per block and per stage, with the bf16
mixed-precision policy; HSDP too), or with ddp a gradient all-reduce after the schedule (DDP's
semantics without its wrapper, which does not know the pipeline's backward).

The loss is the entry point's, the one its forward_step computes of the logits: the trainer hands
``loss_fn(logits, micro-batch) -> (loss, metrics)`` to every step, and the last stage runs it on
each micro-batch (the schedule's targets are micro-batch numbers, so that the loss reads
whatever the batch holds). RETRO's budget loss, ``budget_loss_fn(gate mean)`` of the micro-batch's
mean gate over all retro layers and the chunks with a real neighbour, is added where the gates
are: a forward hook on each stage computes its gates' share of that mean and attaches the
budget of the share (the budget is linear) to its output, whose backward (run by the schedule)
then also backpropagates it, as if it were part of the loss. The shares of every stage and
micro-batch, summed over stages and averaged over micro-batches, are the logged gate mean.

Loss scaling is one process's: each micro-batch's mean loss is divided by the number of
micro-batches before backward (``scale_grads=False``: torch's own scaling would divide a
parameter shared by two stages of one rank twice).
"""

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.tensor import DTensor

from megatron.models.gpt.model import is_tied as _is_tied
from megatron.models.retro.model import BUDGET_LOSS, GATE_MEAN, RetroBlock, RetroModel
from megatron.parallel.config import ParallelConfig
from megatron.parallel.layout import DistEnv, Parallelized, RunConfig, resolve_batch_sizes
from megatron.parallel.mesh import ParallelMesh, build_device_mesh, data_parallel_rank_and_size
from megatron.parallel.parallelize import parallelize_model
from megatron.parallel.tensor_parallel import loss_parallel_context

SCHEDULES = {"1F1B": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved-1F1B": ScheduleInterleaved1F1B}
SHARED_EMBEDDING = "tok_embeddings.weight"


# ----------------------------------------------------------------------------- where to cut

def layer_costs(model: nn.Module, seq_length: int) -> list[float]:
    """Forward FLOPs of each decoder layer per sample, 2 x parameters x tokens they multiply:
    decoder weights see the s tokens, the encoder's weights and CCA's keys/values the l x k x r
    neighbour tokens, so a retro layer, and most of all the one holding the encoder, costs more.
    Attention score FLOPs are left out (small next to the matmuls at these widths)."""
    neighbor_tokens = 0
    if isinstance(model, RetroModel):
        rc = model.retro_cfg
        neighbor_tokens = -(-seq_length // rc.chunk_length) * rc.num_neighbors * rc.retrieved_length
    costs = []
    for layer in model.layers.values():
        cost = 0.0
        for name, p in layer.named_parameters():
            on_neighbors = name.startswith(("encoder.", "cca.wk.", "cca.wv."))
            cost += 2.0 * p.numel() * (neighbor_tokens if on_neighbors else seq_length)
        costs.append(cost)
    return costs


def balanced_split(costs: list[float], num_stages: int, last_extra: float = 0.0,
                   first_stage_layers: int | None = None) -> list[int]:
    """Layers per stage: contiguous, at least one each, minimising the most expensive stage
    (``last_extra``: the head's cost, on the last stage). ``first_stage_layers`` fixes the
    first stage (Megatron's --decoder-first-pipeline-num-layers) and balances the rest."""
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"{num_stages} pipeline stages need at least as many layers, the model has {n}")
    if first_stage_layers is not None:
        if not 1 <= first_stage_layers <= n - (num_stages - 1):
            raise ValueError(f"--decoder-first-pipeline-num-layers {first_stage_layers} leaves no layer for "
                             f"some of the other {num_stages - 1} stages ({n} layers)")
        if num_stages == 1:
            return [n]
        return [first_stage_layers] + balanced_split(costs[first_stage_layers:], num_stages - 1, last_extra)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i, j, last):  # layers i..j-1 as one stage
        return prefix[j] - prefix[i] + (last_extra if last else 0.0)

    # best[s][j]: (max stage cost, split) for the first j layers in s stages
    best = {(1, j): (cost(0, j, num_stages == 1), [j]) for j in range(1, n + 1)}
    for s in range(2, num_stages + 1):
        for j in range(s, n + 1):
            best[s, j] = min(
                ((max(best[s - 1, i][0], cost(i, j, s == num_stages)), best[s - 1, i][1] + [j - i])
                 for i in range(s - 1, j)), key=lambda t: t[0])
    return best[num_stages, n][1]


def stage_layers(model: nn.Module, split: list[int]) -> list[list[str]]:
    keys = list(model.layers.keys())
    if sum(split) != len(keys) or min(split) < 1:
        raise ValueError(f"pipeline split {split} must give each stage >= 1 layer and sum to {len(keys)} layers")
    out, start = [], 0
    for count in split:
        out.append(keys[start:start + count])
        start += count
    return out


# ----------------------------------------------------------------------------- stage modules

def _encoder_layer(model: nn.Module) -> str | None:
    for key, layer in model.layers.items():
        if isinstance(layer, RetroBlock) and layer.encoder is not None:
            return key
    return None


class _AddToBackward(torch.autograd.Function):
    """Identity on ``output``; its backward also backpropagates ``loss`` (a scalar the stage
    computed) with gradient 1, i.e. adds ``loss`` to what the pipeline differentiates."""

    @staticmethod
    def forward(ctx, output, loss):
        ctx.loss_meta = (loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.loss_meta
        return grad, torch.ones((), dtype=dtype, device=device)


def embedding_stages(model: nn.Module, stage_keys: list[list[str]]) -> set[int]:
    """The stages that use the token embedding: the first, the encoder's (it embeds the
    neighbours) and the last when the head is tied to it."""
    encoder_key = _encoder_layer(model)
    users = {0} | ({len(stage_keys) - 1} if _is_tied(model) else set())
    return users | {s for s, keys in enumerate(stage_keys) if encoder_key in keys}


def prune_to_stages(model: nn.Module, stage_keys: list[list[str]], local_stages: list[int]) -> nn.Module:
    """Remove from ``model`` (in place) what no local stage uses; names of what stays are unchanged."""
    num_stages = len(stage_keys)
    keep = {k for s in local_stages for k in stage_keys[s]}
    uses_embedding = bool(embedding_stages(model, stage_keys) & set(local_stages))
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if not uses_embedding:
        model.tok_embeddings = None
    if num_stages - 1 not in local_stages:
        model.norm = None
        model.output = None
    return model


def stage_view(model: nn.Module, keys: list[str], *, embedding: bool, head: bool) -> nn.Module:
    """One of several stages of a rank's pruned model: an instance of the model's class holding
    layers ``keys``, the embedding if ``embedding`` and the norm and head if ``head``. The
    submodules are the model's (shared, so parameter names and optimizer state stay the
    model's); the module and hook registries are its own, for FSDP and the schedule's hooks."""
    stage = copy.copy(model)
    nn.Module.__init__(stage)  # fresh registries; cfg and the model's other plain attributes stay
    for name, child in model.named_children():
        setattr(stage, name, child)
    for name, buffer in model.named_buffers(recurse=False):
        stage.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
    stage.layers = nn.ModuleDict({k: model.layers[k] for k in keys})
    if not embedding:
        stage.tok_embeddings = None
    if not head:
        stage.norm = stage.output = None
    return stage.train(model.training)


def _encoded_neighbors_by_keyword(stage: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a RETRO stage: a stage after the encoder's receives (hidden states,
    encoded neighbours) as the previous stage returned them; RetroModel takes the second by keyword."""
    if len(args) == 2:
        hidden, encoded = args
        return (hidden,), {**kwargs, "encoded_neighbors": encoded}
    return None


class _GateShare:
    """Forward hook of a stage holding gates: records the stage's share of the micro-batch's
    gate mean (RetroModel.gate_mean over its layers, weighted by their part of all the model's
    gates) and, with the step's ``budget_loss_fn``, adds its budget of the share, scaled as the
    loss is (/ micro-batches), to the backward of the stage's output (see the module docstring)."""

    def __init__(self, weight: float, num_microbatches: int):
        self.weight, self.num_microbatches = weight, num_microbatches
        self.budget_loss_fn = None  # the running step's (PipelinedModel._run)
        self.shares: list[torch.Tensor] = []

    def __call__(self, stage: nn.Module, args: tuple, output):
        mean = stage.gate_mean()
        if mean is None:  # ran without neighbours
            return None
        share = mean * self.weight
        self.shares.append(share.detach())
        if self.budget_loss_fn is None or not torch.is_grad_enabled():
            return None
        budget = self.budget_loss_fn(share) / self.num_microbatches
        if isinstance(output, tuple):
            return (_AddToBackward.apply(output[0], budget), *output[1:])
        return _AddToBackward.apply(output, budget)


def _num_gates(model: nn.Module) -> int:
    return sum(1 for layer in model.layers.values() if isinstance(layer, RetroBlock) and layer.gate is not None)


# ----------------------------------------------------------------------------- the pipelined model

def _pipeline_lines(mesh: ParallelMesh) -> list[list[int]]:
    """Global ranks of every pipeline line (same dp and tp coordinates, pp = 0..P-1)."""
    ranks = mesh.world.mesh
    return ranks.reshape(ranks.shape[0], -1).T.tolist()


class PipelinedModel:
    """This rank's stages, schedule and the gradient bookkeeping around them.

    train_step(batch, loss_fn, budget_loss_fn) / eval_step(...): batch = {"text": int64
    [n x mbs, s + 1], optional "neighbor_tokens", "neighbor_mask", anything else loss_fn reads}
    holding this data-parallel rank's n micro-batches; returns loss_fn's metrics averaged over
    them on every rank of the pipeline."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, *, num_microbatches: int, schedule: str = "1F1B",
                 virtual_stages: int = 1, split: list[int] | None = None,
                 first_stage_layers: int | None = None, seq_length: int | None = None,
                 sequence_parallel: bool = False, fsdp: bool = False,
                 bf16: bool = False, recompute_granularity: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor"):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown --pipeline-schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")
        interleaved = schedule == "interleaved-1F1B"
        if virtual_stages > 1 and not interleaved:
            raise ValueError(f"{virtual_stages} virtual pipeline stages per rank need --pipeline-schedule "
                             f"interleaved-1F1B, not {schedule}")
        pp_mesh = mesh["pp"]
        self.pp_size, self.pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
        if schedule != "gpipe" and num_microbatches < self.pp_size:
            raise ValueError(f"--pipeline-schedule {schedule} needs at least --pipeline-model-parallel-size "
                             f"{self.pp_size} micro-batches per iteration, got {num_microbatches} (--global-batch-size "
                             "/ (--micro-batch-size x data-parallel size)); raise the global batch or use gpipe")
        self.pp_group = pp_mesh.get_group()
        self.dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
        self.dp_size = mesh["dp"].size()
        self.num_microbatches = num_microbatches
        num_stages = self.pp_size * virtual_stages
        device = next(model.parameters()).device

        if split is None:
            seq = seq_length if seq_length is not None else model.cfg.seq_length
            head = 2.0 * model.output.weight.numel() * seq
            split = balanced_split(layer_costs(model, seq), num_stages, head, first_stage_layers)
        if len(split) != num_stages:
            raise ValueError(f"pipeline split {split} has {len(split)} stages, expected {num_stages}")
        self.split = split
        stage_keys = stage_layers(model, split)
        local = list(range(self.pp_rank, num_stages, self.pp_size))
        self.local_stages = local

        # Which pipeline ranks hold a copy of the token embedding (see the module docstring).
        uses_embedding = embedding_stages(model, stage_keys)
        self.embedding_ranks = sorted({s % self.pp_size for s in uses_embedding})
        self._embedding_group = None
        if len(self.embedding_ranks) > 1:
            # new_group is collective over the world: every rank creates every line's group.
            for line in _pipeline_lines(mesh):
                group = dist.new_group([line[r] for r in self.embedding_ranks])
                if dist.get_rank() in line:
                    self._embedding_group = group

        self.num_gates = _num_gates(model)
        # Each stage is the model pruned to it: the rank's model itself, or views of it when the
        # rank runs several stages.
        self.model = prune_to_stages(model, stage_keys, local)
        self.stages = [self.model] if len(local) == 1 else [
            stage_view(self.model, stage_keys[s], embedding=s in uses_embedding, head=s == num_stages - 1)
            for s in local]
        self.fsdp = fsdp and self.dp_group is not None
        if self.fsdp and sum(stage.tok_embeddings is not None for stage in self.stages) > 1:
            raise ValueError("FSDP with interleaved stages that share the token embedding on one rank "
                             "is not supported; use --data-parallel-type ddp")
        # The stage's share of the TP(+SP) plan (activations between stages stay plain tensors, the
        # last stage's logits sharded on the vocabulary for loss_parallel()), then recompute and
        # compile per block, then FSDP per block and per stage: each stage is an FSDP root that
        # drives FSDP's gradient sync and post-backward itself (PipelineStage knows FSDPModule).
        parallel_cfg = ParallelConfig(tensor_model_parallel_size=mesh["tp"].size(), sequence_parallel=sequence_parallel,
                                      data_parallel_type="fsdp" if fsdp else "ddp")
        parallelize_model(self.model, parallel_cfg, mesh, bf16=bf16, recompute_granularity=recompute_granularity,
                          compile=compile, compile_backend=compile_backend, stages=self.stages)
        self.gate_shares = []
        for stage in self.stages:
            if isinstance(stage, RetroModel):
                stage.register_forward_pre_hook(_encoded_neighbors_by_keyword, with_kwargs=True)
            if _num_gates(stage):
                self.gate_shares.append(_GateShare(_num_gates(stage) / self.num_gates, num_microbatches))
                stage.register_forward_hook(self.gate_shares[-1])
        stages = [PipelineStage(stage, s, num_stages, device, group=self.pp_group)
                  for stage, s in zip(self.stages, local)]
        cls = SCHEDULES[schedule]
        self.schedule = cls(stages if interleaved else stages[0], num_microbatches, loss_fn=self._micro_batch_loss,
                            scale_grads=False)
        self._step_loss = None  # the running step's: (loss_fn, its micro-batches, their metrics by number)
        self._metric_names = {}  # loss_fn -> the names of its metrics, learnt from the last stage once
        self.has_last_stage = num_stages - 1 in local
        self.last_rank = dist.get_global_rank(self.pp_group, self.pp_size - 1)

    def _micro_batch_loss(self, output, index: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of micro-batch ``index``: the step's loss_fn, scaled as one process
        accumulates; its metrics kept by micro-batch (the first step's metadata inference runs
        micro-batch 0 once more before the real ones, whose metrics replace it)."""
        loss_fn, micro_batches, metrics = self._step_loss
        i = int(index)
        loss, metrics[i] = loss_fn(output, micro_batches[i])
        return loss / self.num_microbatches

    def _run(self, batch: dict, train: bool, loss_fn, budget_loss_fn) -> dict[str, torch.Tensor]:
        if budget_loss_fn is not None and not self.num_gates:
            raise ValueError("a budget loss on the gates needs a model with gates (--retro-attention-gate)")
        n = self.num_microbatches
        text = batch["text"]
        if text.shape[0] % n:
            raise ValueError(f"batch of {text.shape[0]} samples does not split into {n} micro-batches")
        tokens = text[:, :-1]
        kwargs = {"token_ids": tokens, **{k: batch[k] for k in ("neighbor_tokens", "neighbor_mask") if k in batch}}
        for gate_share in self.gate_shares:
            gate_share.shares.clear()
            gate_share.budget_loss_fn = budget_loss_fn
        args = (tokens,) if 0 in self.local_stages else ()
        metrics = {}
        if self.has_last_stage:  # the schedule's targets: micro-batch numbers, split as the inputs
            self._step_loss = (loss_fn, split_args_kwargs_into_chunks((), batch, n)[1], metrics)
            target = torch.arange(n)
        else:
            target = None
        run = self.schedule.step if train else self.schedule.eval
        # The loss and its backward run inside the schedule: all of it under loss_parallel() when
        # the head's logits are vocabulary-sharded (it only changes how DTensor cross-entropy runs).
        with loss_parallel_context(self.model):
            run(*args, target=target, return_outputs=False, **kwargs)
        result = self._broadcast_loss_metrics(loss_fn, metrics, text.device)
        if self.num_gates and "neighbor_tokens" in batch:
            result.update(self._gate_metrics(budget_loss_fn))
        return result

    def _broadcast_loss_metrics(self, loss_fn, metrics: dict[int, dict], device: torch.device) -> dict[str, torch.Tensor]:
        """loss_fn's metrics averaged over the micro-batches, from the last stage to every rank of
        the pipeline (only the last stage knows their names: sent on loss_fn's first step only)."""
        names = self._metric_names.get(loss_fn)
        if names is None:
            names = [sorted(metrics[0]) if self.has_last_stage else None]
            dist.broadcast_object_list(names, self.last_rank, group=self.pp_group, device=device)
            names = self._metric_names[loss_fn] = names[0]
        if self.has_last_stage:
            n = self.num_microbatches
            values = torch.stack([torch.stack([torch.as_tensor(metrics[i][k], device=device).float()
                                               for i in range(n)]).sum() / n for k in names])
        else:
            values = torch.zeros(len(names), device=device)
        dist.broadcast(values, self.last_rank, group=self.pp_group)
        return dict(zip(names, values))

    def _gate_metrics(self, budget_loss_fn) -> dict[str, torch.Tensor]:
        """The gate mean of every micro-batch (its shares summed over stages), averaged over the
        micro-batches; the budget's gradient went through the schedule's backward."""
        device = next(self.model.parameters()).device
        n = self.num_microbatches
        # The first step's metadata inference runs one forward of its own before the n real ones.
        mean = sum((torch.stack(g.shares[-n:]).sum() for g in self.gate_shares if g.shares),
                   torch.zeros((), device=device)).float() / n
        dist.all_reduce(mean, group=self.pp_group)
        metrics = {GATE_MEAN: mean}
        if budget_loss_fn is not None:
            metrics[BUDGET_LOSS] = budget_loss_fn(mean)
        return metrics

    def train_step(self, batch: dict, loss_fn, budget_loss_fn=None) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch, ``loss_fn(logits, micro-batch) -> (loss,
        metrics)`` on the last stage's logits plus ``budget_loss_fn(gate mean) -> loss`` (None:
        no budget) of the gates; gradients then summed over the embedding's copies and averaged
        over data-parallel ranks. Returns loss_fn's metrics averaged over the micro-batches (and
        the gate mean and budget loss of RETRO with gates), the same on every rank of the pipeline."""
        metrics = self._run(batch, True, loss_fn, budget_loss_fn)
        self._sync_grads()
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: dict, loss_fn, budget_loss_fn=None) -> dict[str, torch.Tensor]:
        for stage in self.stages:
            stage.eval()
        try:
            return self._run(batch, False, loss_fn, budget_loss_fn)
        finally:
            for stage in self.stages:
                stage.train()

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if p.grad is None:
            return None
        return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad

    def _sync_grads(self):
        if self._embedding_group is not None:
            emb = self.model.tok_embeddings.weight
            if emb.grad is None:
                emb.grad = torch.zeros_like(emb)
            if isinstance(emb.grad, DTensor) and emb.grad.placements != emb.placements:
                # Under TP the lookup's gradient may come back in another layout (replicated or
                # partial) than the head's; the copies' local tensors must be the same shard.
                emb.grad = emb.grad.redistribute(emb.device_mesh, emb.placements)
            dist.all_reduce(self._local_grad(emb), group=self._embedding_group)
        if self.dp_group is not None and not self.fsdp:
            # DDP's semantics without its wrapper (which does not know the pipeline's backward):
            # every rank's loss is a mean over its slice, so the average is the global batch's gradient.
            for p in self.model.parameters():
                g = self._local_grad(p)
                if g is not None:
                    dist.all_reduce(g, group=self.dp_group)
                    g.div_(self.dp_size)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm over every stage (a shared embedding counted once) and, as
        ``torch.nn.utils.clip_grad_norm_`` does, every gradient scaled by min(1, max/norm)."""
        grads, counted = [], []
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if name != SHARED_EMBEDDING or self.pp_rank == self.embedding_ranks[0]:
                counted.append(p.grad)
        squares = torch.zeros((), dtype=torch.float32, device=next(self.model.parameters()).device)
        for g in counted:
            norm = torch.linalg.vector_norm(g.float())
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squares = squares + norm ** 2
        dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt()
        if max_norm < math.inf:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
        return float(total)


# ----------------------------------------------------------------------------- the trainer's hook

def pipeline_layout(parallel: ParallelConfig, num_layers: int) -> tuple[str, int, list[int] | None]:
    """(schedule, virtual stages per rank, explicit split or None for FLOP balancing) from the flags.
    Megatron's rule: --num-layers-per-virtual-pipeline-stage v gives num_layers / (pp x v) stages per rank."""
    pp, per_virtual = parallel.pipeline_model_parallel_size, parallel.num_layers_per_virtual_pipeline_stage
    virtual, split = 1, None
    if per_virtual is not None:
        if parallel.decoder_first_pipeline_num_layers is not None:
            raise ValueError("--decoder-first-pipeline-num-layers and --num-layers-per-virtual-pipeline-stage "
                             "both fix the split: give one")
        if per_virtual < 1 or num_layers % (pp * per_virtual):
            raise ValueError(f"--num-layers {num_layers} is not a multiple of --pipeline-model-parallel-size {pp} "
                             f"x --num-layers-per-virtual-pipeline-stage {per_virtual}")
        virtual = num_layers // (pp * per_virtual)
        split = [per_virtual] * (pp * virtual)
    schedule = parallel.pipeline_schedule or ("interleaved-1F1B" if per_virtual is not None else "1F1B")
    return schedule, virtual, split


def pipeline_parallelize_fn(model: nn.Module, cfg: RunConfig, env: DistEnv) -> Parallelized:
    """megatron.parallel.parallelize.parallelize_fn under --pipeline-model-parallel-size > 1: cut
    the model into this rank's stages, each parallelized as parallelize_model does any model
    (TP(+SP), recompute, compile, then FSDP2; or DDP-style data parallel, see PipelinedModel).
    The trainer drives ``Parallelized.pipeline`` with the entry point's loss_fn and budget_loss_fn
    instead of its forward_step."""
    p, t = cfg.parallel, cfg.training
    if not env.is_distributed:
        raise ValueError(f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size} needs that many "
                         "processes at least (launch with torchrun)")
    mesh = build_device_mesh(p, env.device.type)
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    schedule, virtual, split = pipeline_layout(p, cfg.model.num_layers)
    pipe = PipelinedModel(model, mesh, num_microbatches=resolve_batch_sizes(cfg, dp_size), schedule=schedule,
                          virtual_stages=virtual, split=split,
                          first_stage_layers=p.decoder_first_pipeline_num_layers, seq_length=cfg.model.seq_length,
                          sequence_parallel=p.sequence_parallel, fsdp=p.data_parallel_type == "fsdp", bf16=t.bf16,
                          recompute_granularity=t.recompute_granularity, compile=t.use_torch_compile)
    return Parallelized(pipe.model, dp_rank=dp_rank, dp_size=dp_size,
                        dp_group=mesh["dp"].get_group() if dp_size > 1 else None, pipeline=pipe)

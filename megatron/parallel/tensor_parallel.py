"""Tensor- and sequence-parallel plans (DTensor ``parallelize_module``) for GPTModel and RetroModel.

Megatron's scheme, expressed as placements on the "tp" mesh dimension:

- attention: wq/wk/wv column-parallel (each rank owns num_heads / tp whole heads; the model
  reshapes heads with -1, so it sees only its own), wo row-parallel; MLP: w1/w3 column-, w2
  row-parallel. One all-reduce per sublayer forward and one backward. Grouped-query attention
  splits its key/value heads the same way (num_query_groups / tp each, so tp must divide them):
  rank r's query heads are those whose shared key/value heads rank r holds.
- vocab-parallel embedding: the table is split along the vocabulary (``RowwiseParallel`` on an
  ``nn.Embedding`` shards dim 0); each rank looks up the ids it owns and the partial results are
  summed.
- output head column-parallel with logits left sharded on the vocabulary (``Shard(-1)``), so the
  cross-entropy runs under ``loss_parallel()`` without ever gathering [b, s, V] logits.
- tied embeddings: the embedding table (Shard(0) of [V, h]) and the head's weight (Shard(0) of
  [V, h]) are the same placement of the same tensor, so after the plan the head's weight is
  re-pointed at the embedding's DTensor parameter and the tie survives.
- sequence parallel (``--sequence-parallel``): between the sublayers the residual stream is
  sharded along the sequence (Shard(1)); norms and dropout run on the local sequence slice; the
  all-reduces become all-gather (entering attention/MLP) + reduce-scatter (leaving them).
- without sequence parallel the norms' weights are still turned into replicated DTensors
  (``ReplicateParallel``) so every parameter of the model is a DTensor on the same mesh: optimizers
  with ``foreach=True`` and ``clip_grad_norm_`` fail on a mix of DTensor and plain parameters.

RETRO (``RetroBlock``), on top of the decoder block's plan:

- CCA and the encoder's self- and cross-attention split their heads like any attention
  (wq/wk/wv column-, wo row-parallel; the CCA's keys/values come from the encoder width), the
  encoder's MLP like any MLP. The encoder's activations (k neighbours x r tokens per chunk) are
  replicated across TP ranks, never sequence-sharded: it is small, and its sequence is the
  neighbours', not the decoder's.
- sequence parallel and chunks: a rank's sequence shard (s / tp tokens) need not start on a chunk
  boundary, and CCA shifts the sequence by m - 1 so that every shifted chunk straddles two
  original chunks; besides, the encoder needs whole chunks of decoder states. So the CCA input
  is gathered: ``cca_norm`` normalises the local shard and all-gathers the result once for both
  the encoder and the CCA; the CCA runs on the full sequence, its output projection all-reduces,
  and the result is cut back to the local shard (a slice, no communication) before the residual
  add. Cost per retro layer: one all-gather and one all-reduce of [b, s, h] forward.
- the neighbours' embedding lookup ([b, l, k, r] ids) shares the vocab-parallel table; its
  result is all-reduced to a replicated [b, l, k, r, h] (only [b, s] lookups follow the residual
  layout).
- the CCA gates' scalars become replicated DTensors, and so do the per-chunk gate's inputs
  besides the CCA output (each chunk's neighbour overlap and mask, [b, l, k]: tiny); the values
  it records for the budget loss are handed out as plain tensors, so the loss can be added to
  the LM loss.

Dropout in replicated regions (no sequence parallel, the encoder) must draw the same mask on
every TP rank, so TP ranks must share the RNG seed (the trainer seeds by pipeline stage).
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from megatron.models.gpt.model import is_tied
from megatron.models.retro.model import RetroBlock


def _as_dtensor(x, mesh, placement):
    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, mesh, [placement], run_check=False)
    return x


def _to_local(x):
    return x.to_local() if isinstance(x, DTensor) else x


class ReplicateParallel(ParallelStyle):
    """Parameters become replicated DTensors; inputs and outputs stay plain, replicated tensors.

    The module computes exactly what it computed before; only the parameter type changes (see
    the module docstring). Its gradients need no communication: every TP rank sees the same input.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # partition_fn=None: distribute_module replicates every parameter (broadcast from rank 0).
        return distribute_module(
            module, device_mesh, None,
            lambda mod, inputs, mesh: tuple(_as_dtensor(x, mesh, Replicate()) for x in inputs),
            lambda mod, output, mesh: _to_local(output))


class SequenceParallelGathered(SequenceParallel):
    """SequenceParallel on the local sequence shard, output all-gathered to the full sequence as
    a plain tensor (the CCA norm: its consumers need whole chunks)."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=[Replicate()]).to_local()


class VocabParallelEmbedding(RowwiseParallel):
    """Vocabulary-sharded lookup. A [b, s] lookup leaves in the residual layout; any other
    (RETRO's neighbour ids [b, l, k, r]) is all-reduced to replicated."""

    def __init__(self, sequence_parallel: bool):
        super().__init__(input_layouts=Replicate(), output_layouts=residual_layout(sequence_parallel))

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.ndim != 3:
            output_layouts = (Replicate(),)
        return RowwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)


class GateParallel(ParallelStyle):
    """A CCA gate (TanhGate: x * tanh(alpha); AttentionGate: x * its per-chunk value of the overlap
    and mask that follow x): scalars and the inputs after x replicated, x in the residual layout,
    so that under sequence parallel the scalars' gradients are summed over the sequence shards.
    Recorded gate values are replaced by their (replicated) local tensors for the budget loss."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.layout = residual_layout(sequence_parallel)

    def _inputs(self, mod, inputs, mesh):
        x, *rest = inputs
        return (_as_dtensor(x, mesh, self.layout), *(_as_dtensor(t, mesh, Replicate()) for t in rest))

    def _output(self, mod, output, mesh):
        for name in ("last_value", "last_real"):
            if isinstance(getattr(mod, name, None), DTensor):
                setattr(mod, name, getattr(mod, name).to_local())
        return _to_local(output)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._inputs, self._output)


def norm_style(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel() if sequence_parallel else ReplicateParallel()


def residual_layout(sequence_parallel: bool):
    """Placement of the residual stream between sublayers."""
    return Shard(1) if sequence_parallel else Replicate()


def replicated_input(prefix: str, layout=Replicate(), kwargs: tuple[str, ...] = ()) -> dict[str, ParallelStyle]:
    """A sublayer's input (first argument, and the named keyword arguments) enters as one replicated
    DTensor, gathered from ``layout`` (the residual stream's). Besides the all-gather under
    sequence parallel, this makes the input's gradient from its several column-parallel
    consumers (wq, wk, wv; w1, w3) one partial sum, all-reduced once instead of once per
    consumer."""
    return {prefix: PrepareModuleInput(
        input_layouts=(layout,), desired_input_layouts=(Replicate(),),
        input_kwarg_layouts={k: layout for k in kwargs} or None,
        desired_input_kwarg_layouts={k: Replicate() for k in kwargs} or None)}


def attention_plan(prefix: str, output_layout) -> dict[str, ParallelStyle]:
    """Heads split across TP ranks: q/k/v column-parallel, output projection row-parallel."""
    return {
        f"{prefix}.wq": ColwiseParallel(),
        f"{prefix}.wk": ColwiseParallel(),
        f"{prefix}.wv": ColwiseParallel(),
        f"{prefix}.wo": RowwiseParallel(output_layouts=output_layout),
    }


def mlp_plan(prefix: str, mlp: nn.Module, output_layout) -> dict[str, ParallelStyle]:
    plan = {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel(output_layouts=output_layout)}
    if mlp.w3 is not None:
        plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


def transformer_block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for a ``TransformerBlock`` (names relative to the block)."""
    residual = residual_layout(sequence_parallel)
    return {
        "attention_norm": norm_style(sequence_parallel),
        **replicated_input("attention", residual),
        **attention_plan("attention", residual),
        "mlp_norm": norm_style(sequence_parallel),
        **replicated_input("mlp", residual),
        **mlp_plan("mlp", block.mlp, residual),
    }


def retro_encoder_plan(encoder: nn.Module) -> dict[str, ParallelStyle]:
    """Plan for a ``RetroEncoder`` (names relative to it): replicated activations, heads and FFN split."""
    plan = {"norm": ReplicateParallel()}
    if encoder.input_proj is not None:
        plan["input_proj"] = ReplicateParallel()
    if encoder.skip_norm is not None:
        plan["skip_norm"] = ReplicateParallel()
    for name, layer in encoder.layers.items():
        p = f"layers.{name}"
        plan.update({f"{p}.attention_norm": ReplicateParallel(), **replicated_input(f"{p}.attention"),
                     **attention_plan(f"{p}.attention", Replicate()),
                     f"{p}.mlp_norm": ReplicateParallel(), **replicated_input(f"{p}.mlp"),
                     **mlp_plan(f"{p}.mlp", layer.mlp, Replicate())})
        if layer.cross_attention is not None:
            plan.update({f"{p}.cross_attention_norm": ReplicateParallel(),
                         **replicated_input(f"{p}.cross_attention", kwargs=("kv",)),
                         **attention_plan(f"{p}.cross_attention", Replicate())})
    return plan


def retro_block_plan(block: RetroBlock, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The decoder block's plan plus CCA, encoder and gate (see the module docstring)."""
    plan = transformer_block_plan(block, sequence_parallel)
    plan["cca_norm"] = SequenceParallelGathered() if sequence_parallel else ReplicateParallel()
    plan.update(attention_plan("cca", Replicate()))
    if sequence_parallel:
        plan["cca"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    plan["cca_gate"] = GateParallel(sequence_parallel)
    if block.gate is not None:
        plan["gate"] = GateParallel(sequence_parallel)
    if block.encoder is not None:
        plan.update({f"encoder.{name}": style for name, style in retro_encoder_plan(block.encoder).items()})
    return plan


def block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if isinstance(block, RetroBlock):
        return retro_block_plan(block, sequence_parallel)
    return transformer_block_plan(block, sequence_parallel)


def embedding_and_head_plan(model: nn.Module, sequence_parallel: bool,
                            loss_parallel_enabled: bool) -> dict[str, ParallelStyle]:
    """Plan for the modules outside the blocks; a pipeline stage may hold only some of them."""
    plan = {
        "tok_embeddings": VocabParallelEmbedding(sequence_parallel),
        "norm": norm_style(sequence_parallel),
        "output": ColwiseParallel(
            input_layouts=residual_layout(sequence_parallel),
            output_layouts=Shard(-1) if loss_parallel_enabled else Replicate(),
            use_local_output=not loss_parallel_enabled,
        ),
    }
    return {name: style for name, style in plan.items() if getattr(model, name, None) is not None}


def check_divisible(model: nn.Module, tp: int, sequence_parallel: bool):
    cfg = model.cfg
    sizes = [("--num-attention-heads", cfg.num_attention_heads), ("--ffn-hidden-size", cfg.ffn_hidden_size),
             ("the padded vocabulary size", cfg.vocab_size)]
    if cfg.num_query_groups is not None:
        sizes.append(("--num-query-groups", cfg.num_query_groups))
    retro_cfg = getattr(model, "retro_cfg", None)
    if retro_cfg is not None:
        enc = retro_cfg.encoder_model_config(cfg)
        sizes += [("the retrieval encoder's attention heads", enc.num_attention_heads),
                  ("the retrieval encoder's FFN size", enc.ffn_hidden_size)]
    for name, value in sizes:
        if value % tp:
            raise ValueError(f"{name} {value} is not divisible by --tensor-model-parallel-size {tp}")
    if sequence_parallel and cfg.seq_length % tp:
        raise ValueError(
            f"--sequence-parallel needs --seq-length {cfg.seq_length} divisible by "
            f"--tensor-model-parallel-size {tp}"
        )


def retie_output_head(model: nn.Module):
    """After the plan both the embedding and the head hold their own DTensor copy of the tied
    table; point the head back at the embedding's parameter (same placement: Shard(0) of [V, h])."""
    emb, head = model.tok_embeddings.weight, model.output.weight
    if emb.placements != head.placements:
        raise RuntimeError(f"tied embedding placements differ: embedding {emb.placements}, head {head.placements}")
    model.output.weight = emb


def parallelize_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool,
                                loss_parallel_enabled: bool = True) -> nn.Module:
    """Apply the TP(+SP) plan in place. With ``loss_parallel_enabled`` the model returns logits as a
    DTensor sharded on the vocabulary: compute the loss and call backward inside
    ``loss_parallel_context(model)``."""
    check_divisible(model, tp_mesh.size(), sequence_parallel)
    tied = is_tied(model)
    parallelize_module(model, tp_mesh, embedding_and_head_plan(model, sequence_parallel, loss_parallel_enabled))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(block, sequence_parallel))
    if tied:
        retie_output_head(model)
    model.loss_parallel = loss_parallel_enabled and getattr(model, "output", None) is not None
    return model


def loss_parallel_context(model: nn.Module):
    """The context the loss and its backward must run in: ``loss_parallel()`` when the model's
    logits are vocabulary-sharded DTensors, else nothing."""
    return loss_parallel() if getattr(model, "loss_parallel", False) else nullcontext()

"""Tensor- and sequence-parallel plans (DTensor ``parallelize_module``) for GPTModel.

Megatron's scheme, expressed as placements on the "tp" mesh dimension:

- attention: wq/wk/wv column-parallel (each rank owns num_heads / tp whole heads; the model
  reshapes heads with -1, so it sees only its own), wo row-parallel; MLP: w1/w3 column-, w2
  row-parallel. One all-reduce per sublayer forward and one backward.
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

Dropout in replicated regions (no sequence parallel) must draw the same mask on every TP rank,
so TP ranks must share the RNG seed (the trainer seeds by pipeline stage, not by TP rank).
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle


class ReplicateParallel(ParallelStyle):
    """Parameters become replicated DTensors; inputs and outputs stay plain, replicated tensors.

    The module computes exactly what it computed before; only the parameter type changes (see
    the module docstring). Its gradients need no communication: every TP rank sees the same input.
    """

    @staticmethod
    def _to_dtensor(module, inputs, mesh):
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
            for x in inputs
        )

    @staticmethod
    def _to_local(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # partition_fn=None: distribute_module replicates every parameter (broadcast from rank 0).
        return distribute_module(module, device_mesh, None, self._to_dtensor, self._to_local)


def norm_style(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel() if sequence_parallel else ReplicateParallel()


def residual_layout(sequence_parallel: bool):
    """Placement of the residual stream between sublayers."""
    return Shard(1) if sequence_parallel else Replicate()


def self_attention_plan(prefix: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for an ``Attention`` module called as ``attention(x, ...)``: x arrives in the residual
    layout and is gathered to the full sequence, because every query attends over all keys."""
    return {
        prefix: PrepareModuleInput(
            input_layouts=(residual_layout(sequence_parallel),), desired_input_layouts=(Replicate(),)
        ),
        **attention_projections_plan(prefix, residual_layout(sequence_parallel)),
    }


def attention_projections_plan(prefix: str, output_layout) -> dict[str, ParallelStyle]:
    """Heads split across TP ranks: q/k/v column-parallel, output projection row-parallel."""
    return {
        f"{prefix}.wq": ColwiseParallel(),
        f"{prefix}.wk": ColwiseParallel(),
        f"{prefix}.wv": ColwiseParallel(),
        f"{prefix}.wo": RowwiseParallel(output_layouts=output_layout),
    }


def mlp_plan(prefix: str, mlp: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    plan = {
        prefix: PrepareModuleInput(
            input_layouts=(residual_layout(sequence_parallel),), desired_input_layouts=(Replicate(),)
        ),
        f"{prefix}.w1": ColwiseParallel(),
        f"{prefix}.w2": RowwiseParallel(output_layouts=residual_layout(sequence_parallel)),
    }
    if getattr(mlp, "w3", None) is not None:
        plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


def transformer_block_plan(sequence_parallel: bool, block: nn.Module) -> dict[str, ParallelStyle]:
    """Plan for a ``TransformerBlock`` (names relative to the block)."""
    return {
        "attention_norm": norm_style(sequence_parallel),
        **self_attention_plan("attention", sequence_parallel),
        "mlp_norm": norm_style(sequence_parallel),
        **mlp_plan("mlp", block.mlp, sequence_parallel),
    }


def embedding_and_head_plan(model: nn.Module, sequence_parallel: bool,
                            loss_parallel_enabled: bool) -> dict[str, ParallelStyle]:
    """Plan for the modules outside the blocks; a pipeline stage may hold only some of them."""
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual_layout(sequence_parallel)),
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
    for name, value in (("--num-attention-heads", cfg.num_attention_heads),
                        ("--ffn-hidden-size", cfg.ffn_hidden_size),
                        ("the padded vocabulary size", cfg.vocab_size)):
        if value % tp:
            raise ValueError(f"{name} {value} is not divisible by --tensor-model-parallel-size {tp}")
    if sequence_parallel and cfg.seq_length % tp:
        raise ValueError(
            f"--sequence-parallel needs --seq-length {cfg.seq_length} divisible by "
            f"--tensor-model-parallel-size {tp}"
        )


def is_tied(model: nn.Module) -> bool:
    emb, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    return emb is not None and head is not None and head.weight is emb.weight


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
        parallelize_module(block, tp_mesh, transformer_block_plan(sequence_parallel, block))
    if tied:
        retie_output_head(model)
    model.loss_parallel = loss_parallel_enabled and getattr(model, "output", None) is not None
    return model


def loss_parallel_context(model: nn.Module):
    """The context the loss and its backward must run in: ``loss_parallel()`` when the model's
    logits are vocabulary-sharded DTensors, else nothing."""
    return loss_parallel() if getattr(model, "loss_parallel", False) else nullcontext()

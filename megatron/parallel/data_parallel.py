"""Data parallelism with FSDP2 (``fully_shard``): sharded (FSDP), hybrid (HSDP) or replicated (DDP).

One mechanism for all three, because FSDP2 composes with tensor-parallel DTensor parameters
(it shards them further on the data-parallel dimension) where ``DistributedDataParallel`` does
not accept DTensors:

- fsdp: parameters, gradients and optimizer state sharded over ``dp_shard`` (ZeRO-3;
  Megatron's ``--use-distributed-optimizer`` is the same memory saving and more);
- HSDP: sharded within ``dp_shard`` groups, replicated across ``dp_replicate``;
- ddp: dp_shard = 1, so nothing is sharded and gradients are all-reduced over ``dp_replicate``.

``fully_shard`` is applied to every block (one all-gather / reduce-scatter per block, overlapped
with the neighbouring block's compute) and then to the root (embedding, final norm, head). The
reduction is an average over data-parallel ranks: with each rank's loss a mean over its slice of
the global batch, the gradient is that of the global batch's mean loss.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megatron.parallel.mesh import ParallelMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights, and fp32 gradient reduction (a bf16 sum over many
    ranks loses the small gradients)."""
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def data_parallel_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """The mesh FSDP2 reads: 1-D (dp_shard) for plain FSDP, 2-D (dp_replicate, dp_shard) for HSDP
    and DDP, where its first dimension replicates and the second shards."""
    if mesh["dp_replicate"].size() == 1:
        return mesh["dp_shard"]
    return mesh["dp_replicate", "dp_shard"]


def apply_data_parallel(model: nn.Module, mesh: ParallelMesh, *, bf16: bool = False,
                        reshard_after_forward: bool = True, roots: list[nn.Module] | None = None) -> nn.Module:
    """``fully_shard`` each block of ``model.layers`` and then the root, in place; ``roots``:
    the modules to root instead of ``model`` (a rank's pipeline stages, which share its blocks).

    ``reshard_after_forward=False`` keeps each block's gathered parameters from forward to
    backward (ZeRO-2-like: more memory, one all-gather per block per step instead of two).
    """
    dp_mesh = data_parallel_mesh(mesh)
    policy = mixed_precision_policy(bf16)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding, head) are needed first thing in backward: FSDP's default
    # (None) keeps them gathered after forward.
    for root in roots or [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=policy)
    return model

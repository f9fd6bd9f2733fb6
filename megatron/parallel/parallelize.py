"""The one entry that makes a plain model parallel: ``parallelize_model``.

Order (TorchTitan's, and it matters): tensor/sequence parallel first (it rewrites parameters
into DTensors on the "tp" dimension), then activation checkpointing and compile per block (they
wrap the block's forward, collectives included), then data parallel last (FSDP2 shards the
DTensors once more on the data-parallel dimension and hooks the blocks' forward/backward).
"""

from torch import nn

from megatron.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron.parallel.compile import compile_blocks
from megatron.parallel.data_parallel import apply_data_parallel
from megatron.parallel.mesh import ParallelMesh
from megatron.parallel.tensor_parallel import parallelize_tensor_parallel
from megatron.training.config import ParallelConfig


def parallelize_model(model: nn.Module, parallel_cfg: ParallelConfig, mesh: ParallelMesh | None, *,
                      bf16: bool = False, recompute_granularity: str | None = None,
                      compile: bool = False, compile_backend: str = "inductor",
                      loss_parallel: bool = True) -> nn.Module:
    """Apply TP(+SP), activation checkpointing, compile and FSDP/DDP to ``model`` in place.

    With pipeline parallelism, call it on each stage's module (a stage may lack the embedding
    or the head). ``mesh`` comes from ``megatron.parallel.mesh.init_distributed`` (None on a single process:
    only recompute and compile apply). Build and initialise the model before (same seed on every
    rank), move it to its device, then call this; create the optimizer after.

    With tensor parallelism and ``loss_parallel`` the model returns vocabulary-sharded DTensor
    logits: run the loss and its backward inside ``loss_parallel_context(model)``.
    """
    if parallel_cfg.sequence_parallel and parallel_cfg.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if mesh is not None and mesh["tp"].size() > 1:
        parallelize_tensor_parallel(model, mesh["tp"], sequence_parallel=parallel_cfg.sequence_parallel,
                                    loss_parallel_enabled=loss_parallel)
    if recompute_granularity is not None:
        apply_activation_checkpointing(model, recompute_granularity)
    if compile:
        compile_blocks(model, backend=compile_backend)
    if mesh is not None and mesh["dp"].size() > 1:
        apply_data_parallel(model, mesh, bf16=bf16)
    return model


def needs_autocast(mesh: ParallelMesh | None, bf16: bool) -> bool:
    """bf16 comes from FSDP2's mixed-precision policy when data parallel is applied; otherwise
    (one process, or TP only) the trainer must run forward under ``torch.autocast(bf16)``."""
    return bf16 and (mesh is None or mesh["dp"].size() == 1)

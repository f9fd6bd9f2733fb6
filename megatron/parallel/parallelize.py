"""The one entry that makes a plain model parallel: ``parallelize_model``.

Order (TorchTitan's, and it matters): tensor/sequence parallel first (it rewrites parameters
into DTensors on the "tp" dimension), then activation checkpointing and compile per block (they
wrap the block's forward, collectives included), then data parallel last (FSDP2 shards the
DTensors once more on the data-parallel dimension and hooks the blocks' forward/backward).
"""

from torch import nn

from megatron.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron.parallel.compile import compile_blocks
from megatron.parallel.config import ParallelConfig
from megatron.parallel.data_parallel import apply_data_parallel
from megatron.parallel.layout import DistEnv, Parallelized, RunConfig
from megatron.parallel.mesh import ParallelMesh, build_device_mesh, data_parallel_rank_and_size, mesh_shape
from megatron.parallel.tensor_parallel import loss_parallel_context, parallelize_tensor_parallel


def parallelize_model(model: nn.Module, parallel_cfg: ParallelConfig, mesh: ParallelMesh | None, *,
                      bf16: bool = False, recompute_granularity: str | None = None,
                      compile: bool = False, compile_backend: str = "inductor",
                      loss_parallel: bool = True, stages: list[nn.Module] | None = None) -> nn.Module:
    """Apply TP(+SP), activation checkpointing, compile and FSDP/DDP to ``model`` in place.

    Build and initialise the model first (same seed on every rank) on its device, then call
    this; create the optimizer after. ``mesh`` comes from
    ``megatron.parallel.mesh.build_device_mesh`` (None on a single process: only recompute and
    compile apply). With data parallel and ``bf16``, FSDP2 keeps fp32 master weights and
    computes in bf16; without data parallel, bf16 is the trainer's autocast.

    With pipeline parallelism ``model`` is the rank's model pruned to its ``stages`` (a stage
    may lack the embedding or the head; megatron/parallel/pipeline.py): each stage is an FSDP
    root, and with --data-parallel-type ddp the pipeline all-reduces the gradients itself.

    With tensor parallelism and ``loss_parallel`` the model returns vocabulary-sharded DTensor
    logits: run the loss and its backward inside ``loss_parallel_context(model)``.
    """
    if parallel_cfg.sequence_parallel and parallel_cfg.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    tensor_parallel = mesh is not None and mesh["tp"].size() > 1
    if tensor_parallel:
        parallelize_tensor_parallel(model, mesh["tp"], sequence_parallel=parallel_cfg.sequence_parallel,
                                    loss_parallel_enabled=loss_parallel)
    if recompute_granularity is not None:
        apply_activation_checkpointing(model, recompute_granularity)
    if compile:
        compile_blocks(model, backend=compile_backend, copy_view_inputs=tensor_parallel)
    pipeline_ddp = stages is not None and parallel_cfg.data_parallel_type != "fsdp"
    if mesh is not None and mesh["dp"].size() > 1 and not pipeline_ddp:
        apply_data_parallel(model, mesh, bf16=bf16, roots=stages)
    return model


def parallelize_fn(model: nn.Module, cfg: RunConfig, env: DistEnv, *, loss_parallel: bool = True) -> Parallelized:
    """The trainer's hook (``pretrain(..., parallelize_fn=parallelize_fn)``): build the mesh from
    the flags and apply everything ``cfg`` asks for.

    With tensor parallelism and ``loss_parallel`` (the default) the logits stay sharded on the
    vocabulary (no [b, s, V] gather): the returned ``loss_context`` makes the trainer run
    forward_step and backward under ``loss_parallel()``, and forward_step's loss must accept
    DTensor logits (``megatron.models.loss.lm_loss`` does). ``loss_parallel=False`` gathers the
    logits for a loss that does not.
    """
    if cfg.parallel.pipeline_model_parallel_size > 1:  # hook for megatron/parallel/pipeline.py
        from megatron.parallel.pipeline import pipeline_parallelize_fn  # lazy: pipeline imports this package
        return pipeline_parallelize_fn(model, cfg, env)
    if env.is_distributed:
        mesh = build_device_mesh(cfg.parallel, env.device.type)
    else:
        mesh_shape(cfg.parallel, 1)  # reject flags that cannot hold on one process
        mesh = None
    t = cfg.training
    parallelize_model(model, cfg.parallel, mesh, bf16=t.bf16, recompute_granularity=t.recompute_granularity,
                      compile=t.use_torch_compile, loss_parallel=loss_parallel)
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    return Parallelized(model, dp_rank=dp_rank, dp_size=dp_size,
                        dp_group=mesh["dp"].get_group() if dp_size > 1 else None,
                        loss_context=lambda: loss_parallel_context(model))

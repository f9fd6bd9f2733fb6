"""The parallel section of the run's configuration (--tensor-model-parallel-size,
--data-parallel-type, the pipeline schedule, ...): beside the mesh and the parallel plans
that read it."""

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_type: str = "ddp"  # ddp | fsdp
    data_parallel_sharding_degree: int | None = None  # HSDP: shard within groups of this size
    distributed_backend: str | None = None  # None: nccl on CUDA, gloo otherwise
    distributed_timeout_minutes: int = 10
    # Pipeline (megatron/parallel/pipeline.py). None: interleaved-1F1B with virtual stages, else 1F1B.
    pipeline_schedule: str | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    decoder_first_pipeline_num_layers: int | None = None  # None: stages balanced by FLOPs

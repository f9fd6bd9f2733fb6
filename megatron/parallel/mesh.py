"""The run's one DeviceMesh, built from Megatron's flags: pp x dp_replicate x dp_shard x tp.

Rank order follows Megatron: tensor parallel varies fastest (neighbouring ranks, i.e. the
same node, share the TP all-reduces), pipeline slowest. Data parallel is whatever is left of
the world after tp x pp and is split, for HSDP, into replicate x shard:

- ``--data-parallel-type ddp``: dp_replicate = dp, dp_shard = 1 (gradients all-reduced);
- ``--data-parallel-type fsdp`` (Megatron's ``--use-distributed-optimizer``): dp_shard = dp, or
  ``--data-parallel-sharding-degree S``: dp_shard = S and dp_replicate = dp / S (HSDP: shard
  parameters inside groups of S ranks, typically one node, replicate across them).

Every dimension is always present, even of size 1, so code can ask for ``mesh["tp"]`` without
checking. The two data-parallel dimensions are also flattened into ``mesh["dp"]``, the group
over which data is split and losses are averaged.
"""

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron.parallel.config import ParallelConfig

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class MeshShape:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)


def mesh_shape(cfg: ParallelConfig, world_size: int) -> MeshShape:
    """The mesh a run of ``world_size`` processes builds from ``cfg``; no process group needed."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp} must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --pipeline-model-parallel-size {pp}"
        )
    dp = world_size // (tp * pp)
    degree = cfg.data_parallel_sharding_degree
    if cfg.data_parallel_type == "ddp":
        if degree not in (None, 1):
            raise ValueError(
                f"--data-parallel-sharding-degree {degree} needs --data-parallel-type fsdp "
                "(or --use-distributed-optimizer); DDP does not shard"
            )
        return MeshShape(pp=pp, dp_replicate=dp, dp_shard=1, tp=tp)
    if cfg.data_parallel_type == "fsdp":
        shard = dp if degree is None else degree
        if shard < 1 or dp % shard:
            raise ValueError(
                f"--data-parallel-sharding-degree {degree} must divide the data-parallel size {dp} "
                f"(world {world_size} / (tp {tp} x pp {pp}))"
            )
        return MeshShape(pp=pp, dp_replicate=dp // shard, dp_shard=shard, tp=tp)
    raise ValueError(f"unknown --data-parallel-type {cfg.data_parallel_type!r} (expected ddp or fsdp)")


@dataclass(frozen=True)
class ParallelMesh:
    """The world mesh plus its flattened data-parallel mesh, both indexable by name:
    ``mesh["tp"]``, ``mesh["dp"]``, ``mesh["dp_replicate", "dp_shard"]``."""

    world: DeviceMesh
    dp: DeviceMesh

    def __getitem__(self, names) -> DeviceMesh:
        # DeviceMesh is deprecating slicing a flattened dimension from the root, so "dp" is kept here.
        return self.dp if names == "dp" else self.world[names]

    @property
    def shape(self) -> MeshShape:
        return MeshShape(*(self.world[name].size() for name in MESH_DIM_NAMES))


def build_device_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> ParallelMesh:
    """The mesh over the already initialised default process group (see
    megatron.training.initialize.initialize_distributed); device_type "cuda" or "cpu"."""
    shape = mesh_shape(cfg, dist.get_world_size())
    world = init_device_mesh(device_type, shape.as_tuple(), mesh_dim_names=MESH_DIM_NAMES)
    # DeviceMesh offers flattening only as _flatten (TorchTitan uses it the same way).
    return ParallelMesh(world=world, dp=world["dp_replicate", "dp_shard"]._flatten("dp"))


def data_parallel_rank_and_size(mesh: ParallelMesh | None) -> tuple[int, int]:
    """(rank, size) of this process in the data-parallel group: the data loader takes slice
    ``rank`` of ``size`` of every global batch, so the global batch is the one a single process sees."""
    if mesh is None:
        return 0, 1
    dp_mesh = mesh["dp"]
    return dp_mesh.get_local_rank(), dp_mesh.size()

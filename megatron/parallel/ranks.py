"""This process's rank among the launched ones, and a barrier over them, whether or not
torch.distributed is initialised (without it: rank 0 of 1, and nothing to wait for)."""

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()

"""What the block-wise retro steps share: logging, the rank layout, and the test-only stop hook.

Under torchrun (torch.distributed initialised) the embedding and query blocks are split across
ranks, block b going to rank b % world_size; single-rank work (chunking, index training and
adding, assembling neighbour files, verify) runs on rank 0 while the others wait at a barrier.
"""

import sys

import torch.distributed as dist


def log(message: str) -> None:
    rank = f"[rank {dist.get_rank()}] " if dist.is_available() and dist.is_initialized() else ""
    print(f"retro: {rank}{message}", file=sys.stderr, flush=True)


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class StopAfterBlocks(Exception):
    """Raised by BlockBudget once the allowed number of blocks has been written."""


class BlockBudget:
    """Counts blocks written by this process and stops the run after `limit` of them
    (--retro-stop-after-blocks, used by the tests to interrupt a build at a known point)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.done = 0

    def block_done(self) -> None:
        self.done += 1
        if self.limit is not None and self.done >= self.limit:
            raise StopAfterBlocks(f"stopped after {self.done} blocks (--retro-stop-after-blocks)")

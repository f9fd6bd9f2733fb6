"""What the block-wise retro steps share: logging and the test-only stop hook.

Under torchrun (torch.distributed initialised) the embedding and query blocks are split across
ranks, block b going to rank b % world_size; single-rank work (chunking, index training and
adding, assembling neighbour files, verify) runs on rank 0 while the others wait at a barrier
(rank and barrier: megatron/parallel/ranks.py).
"""

import sys

import torch.distributed as dist

from megatron.parallel.ranks import is_distributed


def log(message: str) -> None:
    rank = f"[rank {dist.get_rank()}] " if is_distributed() else ""
    print(f"retro: {rank}{message}", file=sys.stderr, flush=True)


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

"""One rank's micro-batches, on its device, from a global sample position (megatron/data/loader.py
serves them); the training loop and evaluation draw from it."""

import torch

from megatron.data.loader import build_data_loader


class Batches:
    """This rank's micro-batches from a global sample position; `cyclic` restarts at sample 0
    when the dataset is used up (validation), otherwise running out is an error."""

    def __init__(self, dataset, *, micro_batch_size: int, consumed: int, dp_rank: int, dp_size: int,
                 num_workers: int, seed: int, cyclic: bool, device: torch.device):
        self.dataset, self.cyclic, self.device = dataset, cyclic, device
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_workers, self.seed = num_workers, seed
        self.iterator = self._build(consumed)

    def _build(self, consumed: int):
        return build_data_loader(self.dataset, self.micro_batch_size, consumed, self.dp_rank, self.dp_size,
                                 self.num_workers, self.seed)

    def next(self) -> dict:
        try:
            batch = next(self.iterator)
        except StopIteration:
            if not self.cyclic:
                raise RuntimeError(f"the training dataset ({len(self.dataset)} samples) ran out; "
                                   f"it was built for fewer iterations than this run trains") from None
            self.iterator = self._build(0)
            batch = next(self.iterator)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

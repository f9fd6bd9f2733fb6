"""Micro-batches for training and evaluation, Megatron's pretraining sampler on a DataLoader.

The datasets are already shuffled, so samples are served in dataset order. The sampler walks
the global micro-batch slots (micro_batch_size * dp_size consecutive samples) from
`consumed_samples` on, and data-parallel rank r takes the r-th contiguous micro_batch_size slice
of each slot: the ranks together see exactly what one process would, and a resumed run continues
with the first sample it has not trained on.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader


class PretrainingSampler:
    """Index lists of one rank's micro-batches; an incomplete last global slot is dropped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid micro batch size {micro_batch_size} / data-parallel rank "
                             f"{dp_rank} of {dp_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed samples {consumed_samples} outside the dataset's {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_micro_batch = micro_batch_size * dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self):
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.global_micro_batch
            yield list(range(start, start + self.micro_batch_size))


def collate(items: list[dict]) -> dict:
    """Stack each key's numpy values (arrays or scalars) across the micro-batch into a tensor."""
    batch = {}
    for key in items[0]:
        values = np.stack([np.asarray(item[key]) for item in items])
        if values.dtype.kind not in "biuf":
            raise TypeError(f"sample key {key!r} holds {values.dtype} values, not numbers")
        batch[key] = torch.from_numpy(values)
    return batch


def build_data_loader(dataset, micro_batch_size: int, consumed_samples: int, dp_rank: int = 0,
                      dp_size: int = 1, num_workers: int = 0, seed: int = 0):
    """An iterator over this rank's micro-batches: dicts of tensors, "text" int64 [b, s + 1].

    `seed` seeds the loader's generator, from which worker processes derive their seeds, so
    any randomness inside a dataset's __getitem__ repeats from run to run.
    """
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)

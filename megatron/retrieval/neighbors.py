"""A work dir's neighbours as training reads them: a split's neighbour file, checked, and that
split's RetroDataset rebuilt from the work dir's own record of its data (tools/retro/
inspect_workdir.py, benchmarks). Here, over megatron/data, because it reads the work dir: the
data layer's RetroDataset takes the chunk DB and neighbour rows it is given."""

import os

import numpy as np

from megatron.data.builder import SPLIT_NAMES, build_gpt_datasets
from megatron.data.config import DataConfig
from megatron.data.retro_dataset import RetroDataset
from megatron.models.retro.config import RetroConfig
from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.workdir import WorkDir


def load_neighbors(work_dir: str, split: str) -> np.ndarray:
    """The neighbour ids of `split`, memory-mapped; a missing or damaged file is refused, named."""
    path = WorkDir(work_dir).neighbors(split)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; run tools/retro/preprocess_data.py --retro-tasks query-neighbors")
    try:
        neighbors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:  # numpy's own message (e.g. a truncated file) names no file
        raise ValueError(f"{path}: damaged neighbour file ({e}); delete it and rerun "
                         f"tools/retro/preprocess_data.py --retro-tasks query-neighbors") from None
    if neighbors.dtype != np.int64 or neighbors.ndim != 3:
        raise ValueError(f"{path}: expected int64 [samples, chunks, k] neighbours, found {neighbors.dtype} "
                         f"{list(neighbors.shape)}; delete it and rerun --retro-tasks query-neighbors")
    return neighbors


def workdir_dataset(work_dir: str, wd_cfg: dict, split: str, num_neighbors: int | None = None,
                    align_neighbors: bool = RetroConfig.align_neighbors,
                    data_cache_path: str | None = None) -> RetroDataset:
    """A split's samples with their neighbours, from the work dir's own record of the data (its
    config.json) rather than a run's Config, so that sample i is the one neighbour row i was
    queried for. num_neighbors None: every saved neighbour."""
    if not wd_cfg[f"{split}_samples"]:
        raise ValueError(f"--split {split}: the work dir has no {split} samples, hence no neighbours "
                         f"({split}_samples is 0 in {WorkDir(work_dir).config})")
    neighbors = load_neighbors(work_dir, split)
    data = DataConfig(data_path=[str(x) for entry in wd_cfg["data_path"] for x in entry], split=wd_cfg["split"],
                      data_cache_path=data_cache_path)
    # Only this split's samples: each split's sample order is independent of the others' counts.
    counts = tuple(wd_cfg[f"{name}_samples"] if name == split else 0 for name in SPLIT_NAMES)
    gpt = build_gpt_datasets(data, wd_cfg["seq_length"], counts, wd_cfg["seed"])[SPLIT_NAMES.index(split)]
    if gpt is None:
        raise ValueError(f"--split {split}: the work dir's --split {wd_cfg['split']} leaves no {split} documents")
    return RetroDataset(gpt, neighbors, ChunkDB(work_dir, wd_cfg), num_neighbors or neighbors.shape[2],
                        wd_cfg["chunk_length"], wd_cfg["seq_length"], name=split, align_neighbors=align_neighbors)

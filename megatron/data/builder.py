"""Train/valid/test GPT datasets from the --data-path / --split / --data-cache-path arguments.

One prefix gives a GPTDataset per split; several give a BlendedDataset per split over one
GPTDataset per prefix. Each child of a blend is built with ceil(weight * n * 1.005) samples, as
Megatron does, so the greedy blend never runs out of a child's samples. Everything is a pure
function of the arguments, so preprocessing and training build identical datasets.
"""

import math
import os

import numpy as np

from megatron.data.blended_dataset import BlendedDataset, parse_data_path
from megatron.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megatron.data.indexed_dataset import IndexedDataset
from megatron.training.config import DataConfig

SPLIT_NAMES = ("train", "valid", "test")


def _open_indexed(prefix: str) -> tuple[IndexedDataset, int]:
    indexed = IndexedDataset(prefix)
    num_documents = len(indexed.document_indices) - 1
    # Documents are addressed by sequence index below, which needs one sequence per document.
    if num_documents != len(indexed):
        raise ValueError(f"{prefix}.idx: {len(indexed)} sequences in {num_documents} documents; "
                         f"expected one sequence per document")
    return indexed, num_documents


def check_token_ids(prefixes, vocab_size: int, tokenizer: str | None) -> None:
    """Refuse, naming the file, a dataset holding a token id the vocabulary does not have (data
    tokenized with a larger tokenizer, or corrupt values): the embedding lookup would fail with a
    bare IndexError, or not at all when no sampled batch hits the id. Once at start-up; it reads
    each .bin whole (IndexedDataset.max_token)."""
    for prefix in dict.fromkeys(os.path.abspath(p) for p in prefixes):
        largest = IndexedDataset(prefix).max_token()
        if largest >= vocab_size:
            raise ValueError(f"{prefix}.bin: holds token id {largest}, outside the vocabulary of "
                             f"{vocab_size} tokens of the tokenizer {tokenizer}; tokenize the data with "
                             f"this tokenizer (tools/preprocess_data.py) or give the one it was made with")


def build_gpt_datasets(data: DataConfig, seq_length: int, num_samples: tuple[int, int, int], seed: int):
    """(train, valid, test) datasets; each None when 0 samples are asked for or its split is empty."""
    weighted_prefixes = parse_data_path(data.data_path)
    fractions = parse_split(data.split)
    total_weight = sum(w for w, _ in weighted_prefixes)
    opened = [(w / total_weight, prefix, *_open_indexed(prefix)) for w, prefix in weighted_prefixes]
    cache_dir = data.data_cache_path  # None: each GPTDataset uses <dir of its prefix>/cache

    results = []
    for split_index, split_name in enumerate(SPLIT_NAMES):
        n = num_samples[split_index]
        children = []
        for weight, prefix, indexed, num_documents in opened:
            start, end = split_document_ranges(fractions, num_documents)[split_index]
            children.append((weight, prefix, indexed, np.arange(start, end, dtype=np.int64)))
        if n == 0 or all(len(ids) == 0 for _, _, _, ids in children):
            results.append(None)
            continue
        if len(children) == 1:
            _, prefix, indexed, ids = children[0]
            results.append(GPTDataset(indexed, prefix, ids, n, seq_length, seed,
                                      cache_dir, split_name))
            continue
        datasets = []
        for weight, prefix, indexed, ids in children:
            if len(ids) == 0:
                raise ValueError(f"{prefix}: the {split_name} split (--split {data.split}) has no "
                                 f"documents but the blend asks for {split_name} samples from it")
            datasets.append(GPTDataset(indexed, prefix, ids, math.ceil(weight * n * 1.005), seq_length,
                                       seed, cache_dir, split_name))
        blend_cache_dir = cache_dir or datasets[0].cache_dir
        results.append(BlendedDataset(datasets, [w for w, _, _, _ in children], n, seed, blend_cache_dir))
    return tuple(results)

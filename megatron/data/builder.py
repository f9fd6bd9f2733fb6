"""Train/valid/test GPT datasets from the --data-path / --split / --data-cache-path arguments.

One prefix gives a GPTDataset per split; several give a BlendedDataset per split over one
GPTDataset per prefix. Each child of a blend is built with ceil(weight * n * 1.005) samples, as
Megatron does, so the greedy blend never runs out of a child's samples. Everything is a pure
function of the arguments, so preprocessing and training build identical datasets.
"""

import hashlib
import json
import math
import os

import numpy as np

from megatron.data.blended_dataset import BlendedDataset, parse_data_path
from megatron.data.config import DataConfig
from megatron.data.gpt_dataset import (GPTDataset, default_cache_dir, parse_split, save_atomically,
                                       split_document_ranges)
from megatron.data.indexed_dataset import IndexedDataset, content_fingerprint

SPLIT_NAMES = ("train", "valid", "test")


def _open_indexed(prefix: str) -> tuple[IndexedDataset, int]:
    indexed = IndexedDataset(prefix)
    num_documents = len(indexed.document_indices) - 1
    # Documents are addressed by sequence index below, which needs one sequence per document.
    if num_documents != len(indexed):
        raise ValueError(f"{prefix}.idx: {len(indexed)} sequences in {num_documents} documents; "
                         f"expected one sequence per document")
    return indexed, num_documents


def check_token_ids(prefixes, vocab_size: int, tokenizer: str | None, cache_dir: str | None = None) -> None:
    """Refuse, naming the file, a dataset holding a token id the vocabulary does not have (data
    tokenized with a larger tokenizer, or corrupt values): the embedding lookup would fail with a
    bare IndexError, or not at all when no sampled batch hits the id. Once at start-up; each
    dataset's largest id comes from `cached_max_token` (`cache_dir` is --data-cache-path), so only
    the first start after a dataset is built or changed reads its .bin whole."""
    for prefix in dict.fromkeys(os.path.abspath(p) for p in prefixes):
        largest = cached_max_token(prefix, cache_dir)
        if largest >= vocab_size:
            raise ValueError(f"{prefix}.bin: holds token id {largest}, outside the vocabulary of "
                             f"{vocab_size} tokens of the tokenizer {tokenizer}; tokenize the data with "
                             f"this tokenizer (tools/preprocess_data.py) or give the one it was made with")


def max_token_cache_path(prefix: str, cache_dir: str | None = None) -> str:
    """The JSON file caching the largest token id of the dataset at absolute `prefix`: in the
    dataset cache directory its GPTDataset index caches use; named by a hash of the prefix, as
    datasets of one basename may share a --data-cache-path."""
    directory = default_cache_dir(prefix) if cache_dir is None else cache_dir
    return os.path.join(directory, f"{hashlib.md5(prefix.encode()).hexdigest()}-max_token.json")


def cached_max_token(prefix: str, cache_dir: str | None = None) -> int:
    """The largest token id of the indexed dataset at absolute `prefix`. IndexedDataset.max_token
    reads the whole .bin; its result is kept in `max_token_cache_path` with the dataset's
    content_fingerprint and read back while the fingerprint matches, so a later start reads only
    the .idx and the sampled pages of the .bin. A file that is missing, unreadable, not this
    project's JSON or recorded for another fingerprint is never trusted: the .bin is scanned and
    the file rewritten. An unwritable cache directory costs a scan at every start, nothing else.

    It sees what the fingerprint sees: an in-place edit of the .bin that content_fingerprint
    misses keeps the old value, so an out-of-range id written that way after the first start is
    not refused (a start with an empty cache directory refuses it)."""
    path = max_token_cache_path(prefix, cache_dir)
    # Taken before the scan: data changed during it gets a fingerprint the next start will not match.
    fingerprint = content_fingerprint(prefix)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached["fingerprint"] == fingerprint and type(cached["max_token"]) is int:
            return cached["max_token"]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no cache yet, or a damaged one: rescanned and rewritten below
    largest = IndexedDataset(prefix).max_token()
    record = json.dumps({"path_prefix": prefix, "fingerprint": fingerprint, "max_token": largest}).encode()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomically(path, lambda f: f.write(record))
    except OSError as e:
        print(f"note: cannot cache the largest token id of {prefix}.bin in {path} ({e.strerror}); "
              f"it is read whole again at the next start")
    return largest


def sample_counts(train_samples: int | None, train_iters: int | None, global_batch_size: int | None,
                  eval_interval: int, eval_iters: int) -> tuple[int, int, int]:
    """(train, valid, test) sample counts, Megatron's rule: every training sample, one fresh
    validation batch set per evaluation (plus the final one), one test batch set. Training and
    retro preprocessing (which may give --train-samples instead of --train-iters) both count
    with it, so that a work dir holds neighbours for exactly the samples a run reads."""
    if train_samples is None:
        if train_iters is None or global_batch_size is None:
            raise ValueError("give --train-samples, or --train-iters and --global-batch-size, "
                             "as the training run will")
        train_samples = train_iters * global_batch_size
    elif global_batch_size is not None:
        train_iters = train_samples // global_batch_size
    if eval_iters == 0:
        return train_samples, 0, 0
    if global_batch_size is None:
        raise ValueError("--global-batch-size is needed to count the validation samples "
                         "(or pass --eval-iters 0)")
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    return train_samples, valid, eval_iters * global_batch_size


def build_gpt_datasets(data: DataConfig, seq_length: int, num_samples: tuple[int, int, int], seed: int):
    """(train, valid, test) datasets; each None when 0 samples are asked for or its split is empty."""
    weighted_prefixes = parse_data_path(data.data_path)
    fractions = parse_split(data.split)
    total_weight = sum(w for w, _ in weighted_prefixes)
    opened = [(w / total_weight, prefix, *_open_indexed(prefix)) for w, prefix in weighted_prefixes]
    cache_dir = data.data_cache_path  # None: each GPTDataset uses default_cache_dir(its prefix)

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

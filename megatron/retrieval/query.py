"""Neighbours of every chunk of every train/valid sample, as training will read them.

The samples are those of megatron.data.builder.build_gpt_datasets called with training's own
arguments, so row i of WD/neighbors/{split}.npy belongs to dataset[i] of that split. Sample i's
chunks are its first seq_length tokens cut into l = ceil(seq_length / m) chunks (the last one
EOD-padded when m does not divide seq_length). Each chunk is embedded like a DB chunk, k' ids
are asked of the index, and of those the first k are kept that are valid DB chunks and come
from none of the documents the sample chunk's own tokens come from (same dataset file, same
document id). Fewer than k left: the rest is -1, counted in the report. A chunk with no BERT
text gets no neighbours at all.

Results are written per block of samples (resumable, split across ranks), then assembled.
"""

import os
import shutil

import numpy as np
from tqdm import tqdm

from megatron.retrieval.blocks import BlockBudget, log
from megatron.retrieval.chunk_db import DATASET, DOCUMENT
from megatron.retrieval.embedder import chunk_texts
from megatron.retrieval.workdir import WorkDir, open_memmap_atomic, save_npy

# A document is identified across datasets by one int64: dataset_id << 40 | document_id.
_DOCUMENT_BITS = 40
NO_DOCUMENT = -1
# Queries searched and filtered at once: bounds the memory of the candidate arrays.
SEARCH_BATCH = 4096
# Rows short of k neighbours after filtering are searched again, widening k' up to this factor.
WIDEN_LIMIT = 64


def document_keys(dataset_ids: np.ndarray, document_ids: np.ndarray) -> np.ndarray:
    """One int64 per (dataset, document); NO_DOCUMENT where the dataset id is negative."""
    dataset_ids = np.asarray(dataset_ids, dtype=np.int64)
    document_ids = np.asarray(document_ids, dtype=np.int64)
    if document_ids.size and document_ids.max() >= 1 << _DOCUMENT_BITS:
        raise ValueError(f"document id {document_ids.max()} exceeds 2^{_DOCUMENT_BITS}")
    return np.where(dataset_ids >= 0, (dataset_ids << _DOCUMENT_BITS) | document_ids, NO_DOCUMENT)


def filter_neighbors(candidates: np.ndarray, candidate_keys: np.ndarray, candidate_valid: np.ndarray,
                     query_keys: np.ndarray, k: int) -> np.ndarray:
    """The first k candidates of each row that exist (>= 0), are valid, and whose document is not
    among the row's query_keys; -1 where fewer remain.

    candidates, candidate_keys, candidate_valid: [Q, k']; query_keys: [Q, m] (NO_DOCUMENT = none).
    """
    # Reduce each row's query documents to its distinct ones, packed first (usually one or two),
    # so the comparison below loops over a few columns instead of m.
    distinct = np.sort(np.asarray(query_keys, dtype=np.int64), axis=1)
    repeated = np.zeros(distinct.shape, dtype=bool)
    repeated[:, 1:] = distinct[:, 1:] == distinct[:, :-1]
    unused = np.iinfo(np.int64).max
    distinct[repeated | (distinct == NO_DOCUMENT)] = unused
    distinct = np.sort(distinct, axis=1)
    width = int((distinct != unused).sum(axis=1).max(initial=0))

    keep = (candidates >= 0) & candidate_valid
    for column in range(width):
        keep &= candidate_keys != distinct[:, column:column + 1]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(candidates, order, axis=1)
    kept[~np.take_along_axis(keep, order, axis=1)] = -1
    if kept.shape[1] < k:  # fewer candidates than k were asked of the index
        kept = np.pad(kept, ((0, 0), (0, k - kept.shape[1])), constant_values=-1)
    return kept


def dataset_prefix(dataset, dataset_id: int) -> str:
    """The indexed dataset path behind a GPTDataset or a BlendedDataset's child."""
    children = getattr(dataset, "datasets", None)
    child = children[dataset_id] if children is not None else dataset
    return os.path.abspath(child.path_prefix)


def sample_chunks(dataset, sample_ids, seq_length: int, chunk_length: int, eod: int,
                  db_dataset_ids: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document keys), both int64 [len(sample_ids) * l, m], of the samples' chunks.

    db_dataset_ids maps an indexed dataset path to its id in the chunk DB; a sample from a
    dataset outside the DB shares no document with any neighbour."""
    num_chunks = -(-seq_length // chunk_length)
    width = num_chunks * chunk_length
    tokens = np.full((len(sample_ids), width), eod, dtype=np.int64)
    keys = np.full((len(sample_ids), width), NO_DOCUMENT, dtype=np.int64)
    for row, i in enumerate(sample_ids):
        item = dataset[int(i)]
        db_id = db_dataset_ids.get(dataset_prefix(dataset, int(item["dataset_id"])), -1)
        tokens[row, :seq_length] = item["text"][:seq_length]
        documents = dataset.get_document_ids(int(i))[:seq_length]
        keys[row, :seq_length] = document_keys(np.full(seq_length, db_id), documents)
    return tokens.reshape(-1, chunk_length), keys.reshape(-1, chunk_length)


class Searcher:
    """Embeds sample chunks and finds their filtered neighbours in the chunk DB."""

    def __init__(self, db, index, embedder, gpt_tokenizer, seq_length: int, k_query: int, k_save: int,
                 db_dataset_ids: dict):
        self.db = db
        self.index = index
        self.embedder = embedder
        self.gpt_tokenizer = gpt_tokenizer
        self.seq_length = seq_length
        self.k_query = k_query
        self.k_save = k_save
        self.db_dataset_ids = db_dataset_ids
        self.chunks_per_sample = -(-seq_length // db.chunk_length)

    def embed_samples(self, dataset, sample_ids, progress=None):
        """(embeddings float32 [n*l, D], document keys [n*l, m]) of the samples' chunks."""
        tokens, keys = sample_chunks(dataset, sample_ids, self.seq_length, self.db.chunk_length,
                                     self.db.eod, self.db_dataset_ids)
        texts = chunk_texts(tokens, self.db.eod, self.gpt_tokenizer)
        return self.embedder.embed(texts, progress), keys

    def search_filtered(self, queries: np.ndarray, query_keys: np.ndarray, k_query: int) -> np.ndarray:
        """int64 [Q, k]: the first k of k_query index hits per query that survive the filter."""
        _, candidates = self.index.search(np.ascontiguousarray(queries), k_query)
        found = candidates >= 0
        rows = np.asarray(self.db.chunks[np.where(found, candidates, 0).reshape(-1)])
        candidate_keys = document_keys(rows[:, DATASET], rows[:, DOCUMENT]).reshape(candidates.shape)
        candidate_valid = np.asarray(self.db.valid[np.where(found, candidates, 0)]) & found
        return filter_neighbors(candidates, candidate_keys, candidate_valid, query_keys, self.k_save)

    def neighbors(self, queries: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
        """int64 [Q, k] filtered neighbour ids of embedded chunks (-1 padded).

        A chunk of a long document often finds only its own document among the k' nearest
        (code files repeat themselves), so rows left short are searched again with a k' four
        times wider, up to WIDEN_LIMIT x k' or the whole DB; rows that were complete are
        unaffected (their first k survivors are the same in the wider list)."""
        out = np.full((len(queries), self.k_save), -1, dtype=np.int64)
        limit = min(self.index.ntotal, WIDEN_LIMIT * self.k_query)
        for first in range(0, len(queries), SEARCH_BATCH):
            q = queries[first:first + SEARCH_BATCH]
            keys = query_keys[first:first + SEARCH_BATCH]
            kept = self.search_filtered(q, keys, self.k_query)
            k_query = self.k_query
            short = np.flatnonzero((kept < 0).any(axis=1) & np.any(q != 0, axis=1))
            while len(short) and k_query < limit:
                k_query = min(limit, 4 * k_query)
                kept[short] = self.search_filtered(q[short], keys[short], k_query)
                short = short[(kept[short] < 0).any(axis=1)]
            kept[~np.any(q != 0, axis=1)] = -1  # no text, no meaningful query
            out[first:first + len(q)] = kept
        return out

    def sample_neighbors(self, dataset, sample_ids, progress=None) -> np.ndarray:
        """int64 [n, l, k] for the given samples of `dataset`."""
        queries, keys = self.embed_samples(dataset, sample_ids, progress)
        return self.neighbors(queries, keys).reshape(len(sample_ids), self.chunks_per_sample, self.k_save)


def samples_per_block(block_size: int, chunks_per_sample: int) -> int:
    """Blocks of about block_size query chunks, whole samples each."""
    return max(1, block_size // chunks_per_sample)


def damaged_neighbors(path: str, shape: tuple, db) -> str | None:
    """What is wrong with a neighbour file or block, or None when it is one the query step could
    have written: unreadable (e.g. truncated), another size than its header says, not int64 of
    `shape`, or holding an id that is neither -1 nor a valid chunk of `db`. The ids are read in
    slices of ~4M, so memory stays bounded whatever the file's size."""
    try:
        neighbors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        return f"unreadable ({e})"
    if neighbors.dtype != np.int64 or neighbors.shape != tuple(shape):
        return f"{neighbors.dtype} {list(neighbors.shape)} where int64 {list(shape)} was expected"
    size, expected = os.path.getsize(path), neighbors.offset + neighbors.nbytes
    if size != expected:  # np.load maps a file with bytes past its array without a word
        return f"{size} bytes where its header says {expected}"
    bad = 0
    step = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
    for first in range(0, len(neighbors), step):
        ids = np.asarray(neighbors[first:first + step]).reshape(-1)
        out_of_range = (ids < -1) | (ids >= db.num_chunks)
        present = ids[(ids >= 0) & ~out_of_range]
        bad += int(out_of_range.sum()) + int((~np.asarray(db.valid[present])).sum())
    if bad:
        return f"{bad} id(s) neither -1 nor a valid chunk id of the chunk DB (0..{db.num_chunks - 1})"
    return None


def query_split(work_dir: str, split: str, dataset, searcher: Searcher, block_size: int,
                rank: int = 0, world_size: int = 1, budget: BlockBudget | None = None) -> int:
    """Write this rank's missing neighbour blocks of one split; returns how many it computed."""
    wd = WorkDir(work_dir)
    per_block = samples_per_block(block_size, searcher.chunks_per_sample)
    num_samples = len(dataset)
    num_blocks = -(-num_samples // per_block)
    todo = []
    for block in range(rank, num_blocks, world_size):
        rows = min(num_samples, (block + 1) * per_block) - block * per_block
        shape = (rows, searcher.chunks_per_sample, searcher.k_save)
        path = wd.neighbor_block(split, block)
        if not os.path.isfile(path):
            todo.append(block)
        elif problem := damaged_neighbors(path, shape, searcher.db):
            log(f"{path}: damaged neighbour block, {problem}; computing it again")
            todo.append(block)
    log(f"{split} neighbours: {num_blocks} blocks of {per_block} samples, {len(todo)} to compute here")
    total = sum(min(num_samples, (b + 1) * per_block) - b * per_block for b in todo)
    with tqdm(total=total * searcher.chunks_per_sample, desc=f"querying {split} chunks",
              unit=" chunks") as progress:
        for block in todo:
            ids = np.arange(block * per_block, min(num_samples, (block + 1) * per_block))
            save_npy(wd.neighbor_block(split, block), searcher.sample_neighbors(dataset, ids, progress))
            if budget is not None:
                budget.block_done()
    return len(todo)


def assemble_neighbors(work_dir: str, split: str, num_samples: int, chunks_per_sample: int, k: int,
                       block_size: int) -> dict:
    """Concatenate the split's blocks into neighbors/{split}.npy (memmapped, atomic), remove the
    blocks, and return padding statistics."""
    wd = WorkDir(work_dir)
    per_block = samples_per_block(block_size, chunks_per_sample)
    stats = {"samples": num_samples, "chunks": num_samples * chunks_per_sample,
             "chunks_with_fewer_than_k": 0, "chunks_without_neighbors": 0, "padded_slots": 0}
    with open_memmap_atomic(wd.neighbors(split), np.int64, (num_samples, chunks_per_sample, k)) as out:
        for block, first in enumerate(range(0, num_samples, per_block)):
            path = wd.neighbor_block(split, block)
            if not os.path.isfile(path):
                raise ValueError(f"{path}: neighbour block missing; rerun --retro-tasks query-neighbors")
            values = np.load(path, allow_pickle=False)
            out[first:first + len(values)] = values
            missing = values < 0
            stats["padded_slots"] += int(missing.sum())
            stats["chunks_with_fewer_than_k"] += int(missing.any(axis=-1).sum())
            stats["chunks_without_neighbors"] += int(missing.all(axis=-1).sum())
    shutil.rmtree(wd.neighbor_blocks_dir(split))
    log(f"{split} neighbours: wrote {wd.neighbors(split)} [{num_samples}, {chunks_per_sample}, {k}]; "
        f"{stats['chunks_with_fewer_than_k']} of {stats['chunks']} chunks have fewer than {k} "
        f"neighbours ({stats['chunks_without_neighbors']} none, {stats['padded_slots']} slots -1)")
    return stats

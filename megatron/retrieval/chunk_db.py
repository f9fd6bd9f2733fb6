"""The chunk DB: every document of the datastore cut into chunks of m tokens.

Row c of WD/db/chunks.npy is (dataset_id, document_id, token_offset, length) of chunk c, where
dataset_id indexes the work dir config's "db_datasets" and document_id is the sequence index in
that indexed dataset. A document's chunks are consecutive rows; its last chunk may be shorter
than m and is padded with EOD when read. The tokens themselves stay in the indexed datasets and
are gathered from their memory maps, many chunks per numpy call.

Reading a chunk for training returns r = 2m tokens: the chunk and its continuation, which is the
rest of the same document only; past the document's end comes EOD padding.
"""

import os

import numpy as np
from tqdm import tqdm

from megatron.data.indexed_dataset import IndexedDataset
from megatron.retrieval.align import alignment_shifts
from megatron.retrieval.workdir import WorkDir, load_workdir_config, open_memmap_atomic

DATASET, DOCUMENT, OFFSET, LENGTH = range(4)
# Chunks per vectorised step while building: bounds memory, not correctness.
BUILD_BATCH = 1 << 16


class TokenSource:
    """Token spans of the DB's indexed datasets, gathered in bulk from their .bin memory maps."""

    def __init__(self, db_datasets: list[dict], eod: int):
        self.eod = eod
        self.sequence_lengths = []
        self.token_starts = []  # position of each document's first token in its .bin
        self.tokens = []
        for entry in db_datasets:
            indexed = IndexedDataset(entry["path"])
            num_documents, num_tokens = len(indexed), int(indexed.sequence_lengths.sum(dtype=np.int64))
            if (num_documents, num_tokens) != (entry["num_documents"], entry["num_tokens"]):
                raise ValueError(f"{entry['path']}: has {num_documents} documents and {num_tokens} "
                                 f"tokens but the work dir was built from {entry['num_documents']} "
                                 f"and {entry['num_tokens']}; the dataset changed, rebuild the work dir")
            self.sequence_lengths.append(indexed.sequence_lengths)
            self.token_starts.append(indexed.sequence_pointers // indexed.dtype.itemsize)
            # An empty .bin cannot be memory-mapped; it has no chunks to read anyway.
            self.tokens.append(np.memmap(indexed.bin_path, dtype=indexed.dtype, mode="r")
                               if num_tokens else np.zeros(1, dtype=indexed.dtype))

    def gather(self, dataset_ids, document_ids, offsets, counts, width: int) -> np.ndarray:
        """int64 [n, width]: tokens offsets[i] .. offsets[i] + counts[i] of each document, then EOD.

        One fancy-indexing read per dataset, none per chunk."""
        out = np.full((len(dataset_ids), width), self.eod, dtype=np.int64)
        columns = np.arange(width, dtype=np.int64)
        for d in np.unique(dataset_ids):
            rows = np.flatnonzero(dataset_ids == d)
            starts = self.token_starts[d][document_ids[rows]] + offsets[rows]
            inside = columns[None, :] < counts[rows, None]
            positions = np.where(inside, starts[:, None] + columns[None, :], 0)
            out[rows] = np.where(inside, self.tokens[d][positions], self.eod)
        return out

    def document_lengths(self, dataset_ids, document_ids) -> np.ndarray:
        lengths = np.zeros(len(dataset_ids), dtype=np.int64)
        for d in np.unique(dataset_ids):
            rows = np.flatnonzero(dataset_ids == d)
            lengths[rows] = self.sequence_lengths[d][document_ids[rows]]
        return lengths


def count_chunks(db_datasets: list[dict], chunk_length: int) -> int:
    total = 0
    for entry in db_datasets:
        start, end = entry["document_range"]
        lengths = IndexedDataset(entry["path"]).sequence_lengths[start:end].astype(np.int64)
        total += int((-(-lengths // chunk_length)).sum())
    return total


def _chunk_rows(dataset_id: int, document_ids: np.ndarray, lengths: np.ndarray, chunk_length: int):
    """chunks.npy rows of the given documents (vectorised: np.repeat over chunk counts)."""
    per_document = -(-lengths // chunk_length)
    documents = np.repeat(document_ids, per_document)
    first_chunk = np.repeat(np.cumsum(per_document) - per_document, per_document)
    offsets = (np.arange(len(documents), dtype=np.int64) - first_chunk) * chunk_length
    chunk_lengths = np.minimum(chunk_length, np.repeat(lengths, per_document) - offsets)
    return np.stack([np.full(len(documents), dataset_id, dtype=np.int64), documents, offsets,
                     chunk_lengths], axis=1)


def build_chunk_db(work_dir: str, db_datasets: list[dict], chunk_length: int, eod: int,
                   chunk_texts, count_bert_tokens) -> tuple[int, int]:
    """Write db/chunks.npy and db/valid.npy; returns (chunks, valid chunks).

    `chunk_texts(tokens [n, m]) -> list[str]` turns chunks into the retriever's text and
    `count_bert_tokens(texts) -> np.ndarray` counts their BERT tokens; a chunk with none is invalid.
    """
    wd = WorkDir(work_dir)
    num_chunks = count_chunks(db_datasets, chunk_length)
    if num_chunks == 0:
        paths = ", ".join(entry["path"] for entry in db_datasets)
        raise ValueError(f"empty corpus: the datastore documents of {paths} hold no tokens, "
                         f"so there is nothing to retrieve from")

    with open_memmap_atomic(wd.chunks, np.int64, (num_chunks, 4)) as chunks:
        row = 0
        for dataset_id, entry in enumerate(db_datasets):
            start, end = entry["document_range"]
            lengths = IndexedDataset(entry["path"]).sequence_lengths
            for first in range(start, end, BUILD_BATCH):
                last = min(end, first + BUILD_BATCH)
                rows = _chunk_rows(dataset_id, np.arange(first, last, dtype=np.int64),
                                   lengths[first:last].astype(np.int64), chunk_length)
                chunks[row:row + len(rows)] = rows
                row += len(rows)
        assert row == num_chunks

    chunks = np.load(wd.chunks, mmap_mode="r")
    source = TokenSource(db_datasets, eod)
    with open_memmap_atomic(wd.valid, np.bool_, (num_chunks,)) as valid, \
            tqdm(total=num_chunks, desc="chunk DB: checking BERT text", unit=" chunks") as progress:
        for first in range(0, num_chunks, BUILD_BATCH // 16):
            rows = np.asarray(chunks[first:first + BUILD_BATCH // 16])
            tokens = source.gather(rows[:, DATASET], rows[:, DOCUMENT], rows[:, OFFSET],
                                   rows[:, LENGTH], chunk_length)
            valid[first:first + len(rows)] = count_bert_tokens(chunk_texts(tokens)) > 0
            progress.update(len(rows))
        num_valid = int(np.count_nonzero(valid))
    return num_chunks, num_valid


class ChunkDB:
    """Read access to a work dir's chunk DB: `get_tokens`, `num_chunks`, `valid`, `random_valid_ids`."""

    def __init__(self, work_dir: str, cfg: dict | None = None):
        self.work_dir = work_dir
        cfg = load_workdir_config(work_dir) if cfg is None else cfg
        self._cfg = cfg
        wd = WorkDir(work_dir)
        for path in (wd.chunks, wd.valid):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: not found; run --retro-tasks db-build first")
        self.chunk_length = cfg["chunk_length"]
        self.eod = cfg["eod"]
        self.chunks = np.load(wd.chunks, mmap_mode="r")
        self.valid = np.load(wd.valid, mmap_mode="r")
        if self.chunks.ndim != 2 or self.chunks.shape[1] != 4 or self.valid.shape != self.chunks.shape[:1]:
            raise ValueError(f"{wd.db_dir}: chunks.npy {self.chunks.shape} and valid.npy "
                             f"{self.valid.shape} do not describe the same [N, 4] chunk DB")
        self.num_chunks = len(self.chunks)
        self.source = TokenSource(cfg["db_datasets"], self.eod)
        self._any_valid = None  # computed on first use: it reads the whole mask

    def _rows(self, chunk_ids: np.ndarray) -> np.ndarray:
        if len(chunk_ids) and (chunk_ids.min() < 0 or chunk_ids.max() >= self.num_chunks):
            raise IndexError(f"chunk ids must lie in [0, {self.num_chunks}), got "
                             f"[{chunk_ids.min()}, {chunk_ids.max()}]")
        return np.asarray(self.chunks[chunk_ids])

    def get_chunk_tokens(self, chunk_ids) -> np.ndarray:
        """int64 [n, m]: the chunks alone (no continuation), EOD-padded; the retriever's input."""
        rows = self._rows(np.asarray(chunk_ids, dtype=np.int64).reshape(-1))
        return self.source.gather(rows[:, DATASET], rows[:, DOCUMENT], rows[:, OFFSET], rows[:, LENGTH],
                                  self.chunk_length)

    def get_tokens(self, chunk_ids, align_to=None) -> np.ndarray:
        """int64 [..., 2m]: each chunk followed by its continuation within the same document,
        EOD-padded past the document's end. An id of -1 gives all EOD (the caller masks it).

        align_to: int64 [..., m] the chunk each neighbour was retrieved for (broadcast over the
        last axis of chunk_ids: [..., k] ids take [..., m] chunks), or None. Given, each window
        is moved by up to m tokens within its document to where that chunk sits in it
        (megatron/retrieval/align.py); before the document's start comes EOD padding too."""
        ids = np.asarray(chunk_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        m = self.chunk_length
        out = np.full((len(flat), 2 * m), self.eod, dtype=np.int64)
        present = np.flatnonzero(flat >= 0)
        if len(present):
            rows = self._rows(flat[present])
            lengths = self.source.document_lengths(rows[:, DATASET], rows[:, DOCUMENT])
            if align_to is None:
                counts = np.minimum(2 * m, lengths - rows[:, OFFSET])
                out[present] = self.source.gather(rows[:, DATASET], rows[:, DOCUMENT], rows[:, OFFSET],
                                                  counts, 2 * m)
            else:
                queries = np.broadcast_to(np.asarray(align_to, dtype=np.int64)[..., None, :],
                                          (*ids.shape, m)).reshape(-1, m)[present]
                # m tokens before the chunk (none before the document's first) and 3m from it.
                lead = np.minimum(m, rows[:, OFFSET])
                starts = rows[:, OFFSET] - lead
                counts = np.minimum(4 * m - (m - lead), lengths - starts)
                gathered = self.source.gather(rows[:, DATASET], rows[:, DOCUMENT], starts, counts, 4 * m)
                columns = np.arange(4 * m)[None, :] - (m - lead)[:, None]
                windows = np.where(columns >= 0, np.take_along_axis(gathered, np.maximum(columns, 0), 1), self.eod)
                shifts = alignment_shifts(queries, windows, m, self.eod)
                cols = m + shifts[:, None] + np.arange(2 * m)[None, :]
                out[present] = np.take_along_axis(windows, cols, 1)
        return out.reshape(*ids.shape, 2 * m)

    def random_valid_ids(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n chunk ids drawn uniformly from the valid chunks, by rejection (valid is nearly all)."""
        if self._any_valid is None:
            self._any_valid = bool(self.valid.any())
        if not self._any_valid:
            raise ValueError(f"{self.work_dir}: the chunk DB has no valid chunk to draw")
        out = np.empty(0, dtype=np.int64)
        while len(out) < n:
            draw = rng.integers(0, self.num_chunks, size=2 * (n - len(out)) + 8)
            out = np.concatenate([out, draw[self.valid[draw]]])
        return out[:n]

    # Memory maps would be pickled as copies; DataLoader workers reopen the files instead.
    def __getstate__(self):
        return {"work_dir": self.work_dir, "cfg": self._cfg}

    def __setstate__(self, state):
        self.__init__(state["work_dir"], state["cfg"])

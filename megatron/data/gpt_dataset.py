"""GPT pretraining samples over the documents of one split of an indexed dataset.

Megatron-LM semantics. The split's documents are shuffled once per epoch and the epochs are
concatenated into one token stream; sample i is the seq_length + 1 tokens starting at stream
position i * seq_length, so it may span several documents and its last token is the first token
of sample i + 1 (inputs = text[:-1], labels = text[1:]). Three index arrays describe this:

- doc_idx:     the document ids in stream order (one permutation of the split per epoch);
- sample_idx:  [num_samples + 1, 2] (position in doc_idx, token offset) where sample i starts;
- shuffle_idx: the order in which the samples are served.

Building them is the only expensive step, so they are saved as .npy files under cache_dir,
named by a hash of everything they depend on, and memory-mapped by every later build.
"""

import hashlib
import json
import os
import tempfile

import numpy as np

# Bump when the index construction changes so that old cache files are not reused.
INDEX_VERSION = 1
INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


def parse_split(split: str) -> list[float]:
    """Megatron's --split "969,30,1" (or "969/30/1", or "1") -> normalised train/valid/test fractions."""
    separator = "," if "," in split else "/"
    try:
        parts = [float(s) for s in split.split(separator)]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers like '969,30,1'") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(fractions: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges of train/valid/test, by Megatron's rounding rule.

    Each boundary is the previous one plus round(fraction * num_documents); the rounding error is
    then taken off every boundary after the first so the last one lands on num_documents.
    """
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [max(0, b - excess) for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def default_cache_dir(path_prefix: str) -> str:
    """Where a dataset's caches go when --data-cache-path is not given: <its directory>/cache."""
    return os.path.join(os.path.dirname(os.path.abspath(path_prefix)), "cache")


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def save_atomically(path: str, write) -> None:
    """Write through `write(file)` to a temporary name in the same directory, then rename."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_or_build_cached(cache_dir: str, stem: str, description: dict, names, build) -> dict:
    """Memory-map arrays `names` saved as `<cache_dir>/<stem>-<name>.npy`, else `build()` and save them.

    `build()` returns a dict name -> array. Several processes may build at once: each writes its
    own temporary files and the identical results are renamed into place, so readers never see
    a partial file.
    """
    paths = {name: os.path.join(cache_dir, f"{stem}-{name}.npy") for name in names}
    if all(os.path.isfile(p) for p in paths.values()):
        return {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in paths.items()}
    os.makedirs(cache_dir, exist_ok=True)
    arrays = build()
    for name, path in paths.items():
        save_atomically(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
    text = json.dumps(description, indent=2, sort_keys=True).encode()
    save_atomically(os.path.join(cache_dir, f"{stem}-description.json"), lambda f: f.write(text))
    return arrays


def _smallest_int_dtype(max_value: int):
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


def build_gpt_index(sequence_lengths: np.ndarray, document_ids: np.ndarray, num_samples: int,
                    seq_length: int, seed: int) -> dict:
    """The (doc_idx, sample_idx, shuffle_idx) arrays of a GPTDataset; see the module docstring."""
    sizes = np.asarray(sequence_lengths)[document_ids].astype(np.int64)
    tokens_per_epoch = int(sizes.sum())
    # Enough epochs that the stream holds num_samples * seq_length + 1 tokens.
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    rng = np.random.default_rng(seed)

    doc_dtype = _smallest_int_dtype(int(document_ids.max()))
    doc_idx = np.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)]).astype(doc_dtype)

    # Sample i starts at stream position i * seq_length: find the document holding that position
    # (the first whose end lies beyond it; empty documents end where they start and are skipped).
    lengths = np.asarray(sequence_lengths)[doc_idx].astype(np.int64)
    doc_ends = np.cumsum(lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(doc_ends, starts, side="right")
    offset = starts - (doc_ends[position] - lengths[position])
    sample_idx = np.stack([position, offset], axis=1).astype(_smallest_int_dtype(len(doc_idx)))

    # Samples lying wholly in the epochs before the last are shuffled among themselves and served
    # first; those reaching into the last, usually partial, epoch follow, shuffled separately, so
    # the documents a partial epoch repeats are not over-represented early on (Megatron's
    # "separate last epoch", applied whenever there is more than one epoch).
    full = min(num_samples, ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length) if num_epochs > 1 else 0
    shuffle_dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max else np.int64
    shuffle_idx = np.concatenate([rng.permutation(full), full + rng.permutation(num_samples - full)])
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx.astype(shuffle_dtype)}


class GPTDataset:
    """Samples of seq_length + 1 tokens over the documents `document_ids` of an indexed dataset.

    `path_prefix` names the indexed dataset in the cache key and in error messages; `cache_dir`
    defaults to `default_cache_dir(path_prefix)`. len(ds) == num_samples.
    """

    def __init__(self, indexed_dataset, path_prefix: str, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None = None, split_name: str = "train"):
        document_ids = np.asarray(document_ids, dtype=np.int64)
        sequence_lengths = indexed_dataset.sequence_lengths
        tokens_per_epoch = int(sequence_lengths[document_ids].sum(dtype=np.int64)) if len(document_ids) else 0
        if tokens_per_epoch == 0:
            raise ValueError(f"{path_prefix}: the {split_name} split has no tokens "
                             f"({len(document_ids)} documents); change --split or add data")
        if num_samples < 0 or seq_length < 1:
            raise ValueError(f"{path_prefix}: invalid num_samples={num_samples} / seq_length={seq_length}")
        self.indexed_dataset = indexed_dataset
        self.path_prefix = path_prefix
        self.split_name = split_name
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.tokens_per_epoch = tokens_per_epoch
        self.description = {
            "class": "GPTDataset",
            "version": INDEX_VERSION,
            "path_prefix": os.path.abspath(path_prefix),
            "split": split_name,
            "num_documents": len(document_ids),
            "document_ids_md5": hashlib.md5(document_ids.tobytes()).hexdigest(),
            # Guards against reusing an index after the dataset was re-tokenised in place.
            "tokens_per_epoch": tokens_per_epoch,
            "num_sequences": len(sequence_lengths),
            "num_samples": num_samples,
            "seq_length": seq_length,
            "seed": seed,
        }
        self.cache_key = description_hash(self.description)
        self.cache_dir = default_cache_dir(path_prefix) if cache_dir is None else cache_dir
        arrays = load_or_build_cached(
            self.cache_dir, f"{self.cache_key}-GPTDataset-{split_name}", self.description, INDEX_NAMES,
            lambda: build_gpt_index(sequence_lengths, document_ids, num_samples, seq_length, seed))
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]

    def __len__(self) -> int:
        return self.num_samples

    def _pieces(self, idx: int):
        """(document ids, token offsets, token counts) of the document pieces making up sample idx."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} {self.split_name} samples")
        j = int(self.shuffle_idx[idx])
        first, first_offset = (int(v) for v in self.sample_idx[j])
        last, last_offset = (int(v) for v in self.sample_idx[j + 1])
        docs = np.asarray(self.doc_idx[first:last + 1], dtype=np.int64)
        offsets = np.zeros(len(docs), dtype=np.int64)
        offsets[0] = first_offset
        counts = self.indexed_dataset.sequence_lengths[docs].astype(np.int64)
        counts[-1] = last_offset + 1  # the last token is shared with the next sample
        counts -= offsets
        return docs, offsets, counts

    def __getitem__(self, idx: int) -> dict:
        docs, offsets, counts = self._pieces(idx)
        text = np.concatenate([self.indexed_dataset.get(int(d), offset=int(o), length=int(n))
                               for d, o, n in zip(docs, offsets, counts)])
        return {"text": text.astype(np.int64), "dataset_id": np.int64(0)}

    def get_document_ids(self, idx: int) -> np.ndarray:
        """The document id (sequence index in the indexed dataset) of every token of sample idx."""
        docs, _, counts = self._pieces(idx)
        return np.repeat(docs, counts)

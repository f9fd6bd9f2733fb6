"""The retro work dir: its layout, its config.json, and atomic writes into it.

    WD/config.json                   everything that built the work dir (its schema: `BuildRecord`)
    WD/db/chunks.npy                 int64 [N, 4]: (dataset_id, document_id, token_offset, length)
    WD/db/valid.npy                  bool [N]: False where the chunk's BERT text is empty
    WD/embeddings/block_XXXXXX.npy   float16 [<= block_size, D], chunk b*block_size onwards
    WD/index/trained.faiss           the trained, empty index
    WD/index/index.faiss             the index holding every chunk (faiss id == chunk id)
    WD/neighbors/{train,valid}.npy   int64 [num_samples, l, k], -1 = no neighbour
    WD/neighbors/{split}_blocks/     query results per block while the query step runs
    WD/verify.json                   the last verify report

config.json is written when the work dir is created; each later step (and training) compares
the fields it depends on with its own arguments and refuses a mismatch naming the field.
Fields a step learns are added as it finishes: num_chunks and num_valid_chunks (db-build),
chosen_index_str and index_ntrain_used (index-train), index_ntotal (index-add), neighbor_stats
(query-neighbors).
"""

import dataclasses
import json
import os
import uuid
from contextlib import contextmanager

import numpy as np

from megatron.data.blended_dataset import parse_data_path
from megatron.data.indexed_dataset import content_fingerprint
from megatron.data.tokenizers import build_tokenizer

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class WorkDir:
    """Paths inside a work dir."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.config = os.path.join(self.root, CONFIG_NAME)
        self.db_dir = os.path.join(self.root, "db")
        self.chunks = os.path.join(self.db_dir, "chunks.npy")
        self.valid = os.path.join(self.db_dir, "valid.npy")
        self.embeddings_dir = os.path.join(self.root, "embeddings")
        self.index_dir = os.path.join(self.root, "index")
        self.trained_index = os.path.join(self.index_dir, "trained.faiss")
        self.index = os.path.join(self.index_dir, "index.faiss")
        self.neighbors_dir = os.path.join(self.root, "neighbors")
        self.verify_report = os.path.join(self.root, "verify.json")

    def embedding_block(self, block: int) -> str:
        return os.path.join(self.embeddings_dir, f"block_{block:06d}.npy")

    def neighbors(self, split: str) -> str:
        return os.path.join(self.neighbors_dir, f"{split}.npy")

    def neighbor_blocks_dir(self, split: str) -> str:
        return os.path.join(self.neighbors_dir, f"{split}_blocks")

    def neighbor_block(self, split: str, block: int) -> str:
        return os.path.join(self.neighbor_blocks_dir(split), f"block_{block:06d}.npy")


def temp_name(path: str) -> str:
    """An unused name beside `path` (same filesystem, so os.replace is atomic)."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path to write; renamed to `path` only if the block succeeds."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_if_present(tmp)


def remove_leftover_temp_files(root: str) -> int:
    """Delete the temporary files of a killed run (only safe while nothing writes); returns how many."""
    removed = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            np.save(f, array, allow_pickle=False)


@contextmanager
def open_memmap_atomic(path: str, dtype, shape):
    """A writable .npy memmap under a temporary name, flushed and renamed into place on success;
    for arrays too large to build in memory."""
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def normalize_data_path(data_path) -> list:
    """Megatron's --data-path as [[weight fraction, absolute prefix], ...], so that equal blends
    spelled differently ("a" vs "1 ./a", "3 a 7 b" vs "0.3 a 0.7 b") compare equal."""
    if data_path is None:
        return None
    data_path = list(data_path)
    if all(isinstance(item, (list, tuple)) for item in data_path):
        pairs = [(float(w), p) for w, p in data_path]  # already normalised (read from a config)
    else:
        pairs = parse_data_path(data_path)
    total = sum(w for w, _ in pairs)
    return [[round(w / total, 12), os.path.abspath(p)] for w, p in pairs]


def _field(flags: str | None, *, compared: bool = True, normalize=None, older=None):
    """One field of config.json. flags: the arguments behind it, named when a check refuses it.
    compared: whether a rerun of the build compares it (each field that is not says why).
    normalize: brings both values to one spelling before they are compared. older: the value a
    work dir built before the field existed was built with."""
    return dataclasses.field(metadata={"flags": flags, "compared": compared, "normalize": normalize,
                                       "older": older})


@dataclasses.dataclass
class BuildRecord:
    """config.json's schema: the fields the build writes when it creates the work dir
    (megatron/retrieval/tasks.py's describe_build fills every one), and what checks each. A rerun of
    the build compares the `compared` ones (check_build_matches); training compares those
    `expected_for_training` names; generation and live retrieval the tokenizer and chunk length."""
    format_version: int = _field(None, compared=False)  # load_workdir_config refuses another
    library_version: dict = _field(None, compared=False)  # another version may still read it: a note
    tokenizer: dict = _field(None, compared=False)  # the tokenizer's flags, for messages
    tokenizer_fingerprint: str = _field(None)  # refused naming the recorded tokenizer's flags
    vocab_size: int = _field("the tokenizer")
    eod: int = _field("the tokenizer")
    chunk_length: int = _field("--retro-gpt-chunk-length")
    seq_length: int = _field("--seq-length")
    data_path: list = _field("--data-path", normalize=normalize_data_path)
    split: str = _field("--split")
    seed: int = _field("--seed")
    datasets: list = _field("the datasets at --data-path (document and token counts)")
    db_data_path: list | None = _field("--retro-db-data-path", normalize=normalize_data_path)
    db_documents: str = _field("--retro-db-data-path")
    db_datasets: list = _field("--retro-db-data-path, or --data-path and --split")
    dataset_fingerprints: dict = _field(None, compared=False)  # check_dataset_fingerprints names the files
    retriever_model: str = _field(None, compared=False)  # a path: retriever_fingerprint is compared
    retriever_fingerprint: str = _field("--retro-bert-model")
    embedding_dim: int = _field("--retro-bert-model")
    bert_max_chunk_length: int = _field("--retro-bert-max-chunk-length")
    bert_precision: str = _field("--retro-bert-precision", older="fp32")
    block_size: int = _field("--retro-block-size")
    index_str: str | None = _field(None, compared=False)  # None chooses one: compared with chosen_index_str
    index_ntrain: int | None = _field("--retro-index-ntrain")
    num_neighbors_query: int = _field("--retro-query-num-neighbors-query")
    num_neighbors_save: int = _field("--retro-query-num-neighbors-save")
    nprobe: int = _field("--retro-query-nprobe")
    ef_search: int = _field("--retro-query-ef-search")
    train_samples: int = _field("--train-samples, or --train-iters x --global-batch-size")
    valid_samples: int = _field("--train-iters, --eval-interval, --eval-iters and --global-batch-size")
    test_samples: int = _field("--eval-iters and --global-batch-size")


_SCHEMA = {f.name: f.metadata for f in dataclasses.fields(BuildRecord)}


def expected_for_training(data, seq_length: int, seed: int, train_samples: int, valid_samples: int,
                          tokenizer_fingerprint: str, chunk_length: int | None = None) -> dict:
    """The fields training must agree on with the work dir, as keyword arguments for
    check_workdir_matches. `data` is a DataConfig. The GPT datasets' sample order depends on
    every one of these, so neighbour row i only belongs to training sample i when all match."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "data_path": list(data.data_path),
        "split": data.split,
        "seq_length": seq_length,
        "seed": seed,
        "train_samples": train_samples,
        "valid_samples": valid_samples,
        "chunk_length": chunk_length,
    }


_TOKENIZER_FLAGS = {"model": "--tokenizer-model", "vocab_file": "--vocab-file", "merge_file": "--merge-file"}


def _recorded_tokenizer(cfg: dict) -> str:
    """The tokenizer arguments the work dir was built with, as flags (fingerprints alone say
    nothing a user can act on)."""
    recorded = cfg.get("tokenizer")
    if not recorded:  # not recorded by older versions
        return "the tokenizer it was built with"
    flags = [f"--tokenizer-type {recorded['type']}"] + [
        f"{flag} {recorded[name]}" for name, flag in _TOKENIZER_FLAGS.items() if recorded.get(name)]
    return f"the tokenizer it was built with ({' '.join(flags)})"


def load_workdir_config(work_dir: str) -> dict:
    """The work dir's config.json as a dict; ValueError naming the file when absent or unreadable."""
    path = WorkDir(work_dir).config
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; {work_dir} is not a retro work dir "
                         f"(build it with tools/retro/preprocess_data.py --retro-tasks build)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable work dir config: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported work dir config (format_version "
                         f"{cfg.get('format_version') if isinstance(cfg, dict) else None!r}, "
                         f"expected {FORMAT_VERSION})")
    return cfg


def build_workdir_tokenizer(work_dir: str, cfg: dict):
    """The tokenizer the work dir was built with (config.json's record), refused if its files
    changed since: its ids would decode to other text than the DB's."""
    recorded = cfg.get("tokenizer")
    if not recorded:
        raise ValueError(f"{WorkDir(work_dir).config}: records no tokenizer (built by an older version); "
                         f"rebuild the work dir")
    tokenizer = build_tokenizer(recorded["type"], recorded["model"], vocab_file=recorded["vocab_file"],
                                merge_file=recorded["merge_file"])
    check_workdir_matches(cfg, tokenizer_fingerprint=tokenizer.fingerprint())
    return tokenizer


def check_workdir_matches(cfg: dict, **expected) -> None:
    """Raise ValueError naming the first field whose recorded value differs from `expected`, and
    the arguments behind it (for the tokenizer, those the work dir was built with).

    A field given as None is not checked ("whatever the work dir holds"). data_path and
    db_data_path are compared as normalised blends; JSON round trips (tuples -> lists) are
    ignored.
    """
    for field, want in expected.items():
        if want is None:
            continue
        if field not in cfg:
            raise ValueError(f"retro work dir config has no field {field!r}; it was built by an "
                             f"older version or an unfinished run: rebuild it")
        have = cfg[field]
        schema = _SCHEMA.get(field, {})
        if schema.get("normalize") is not None:
            want = schema["normalize"](want)
        if json.loads(json.dumps(want)) != have:
            flags = _recorded_tokenizer(cfg) if field == "tokenizer_fingerprint" else schema.get("flags")
            raise ValueError(f"retro work dir does not match{' ' + flags if flags else ''}: {field} is "
                             f"{have!r} in the work dir but {want!r} here; use the arguments it was built "
                             f"with or a new --retro-work-dir")


def check_build_matches(cfg: dict, build: dict) -> None:
    """A rerun of the build over the work dir whose config is `cfg`: check_workdir_matches over
    the compared fields of `build` (describe_build's), a field the work dir predates taken as the
    value it was built with."""
    older = {name: field["older"] for name, field in _SCHEMA.items() if field["older"] is not None}
    check_workdir_matches({**older, **cfg}, **{name: value for name, value in build.items()
                                               if _SCHEMA.get(name, {}).get("compared", True)})


def dataset_fingerprints(prefixes) -> dict:
    """{absolute prefix: content_fingerprint} of these indexed datasets, for config.json."""
    return {os.path.abspath(p): content_fingerprint(p) for p in prefixes}


def check_dataset_fingerprints(cfg: dict, current: dict | None = None) -> None:
    """Refuse, naming its files, an indexed dataset whose content differs from the fingerprint
    the work dir recorded at build time (content_fingerprint says what that catches): its
    chunks, embeddings and neighbours would belong to other text. `current` holds fingerprints
    already computed; the others are computed here. A work dir built before fingerprints were
    recorded has none to check."""
    recorded = cfg.get("dataset_fingerprints")
    if recorded is None:
        print("note: this retro work dir records no dataset fingerprints (built by an older "
              "version), so data changed in place goes unnoticed; rebuild it to get the check", flush=True)
        return
    current = current or {}
    for prefix, want in recorded.items():
        have = current.get(prefix) or content_fingerprint(prefix)
        if have != want:
            raise ValueError(f"{prefix}.bin / {prefix}.idx: content changed since the retro work dir was "
                             f"built (fingerprint {want} recorded, {have} now); restore the data or "
                             f"rebuild the work dir")

"""Tokenize a JSONL or parquet corpus into Megatron indexed datasets, one sequence per document.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \\
        --append-eod --workers 4

writes data/corpus_text_document.bin/.idx (one pair per --json-keys key). --input takes JSONL
files (one JSON object per line), parquet files (--json-keys names their string columns; needs
pyarrow: pip install pyarrow), directories (their *.jsonl and *.parquet files, sorted by name)
and globs (their matches, sorted). Sequence i is the i-th document of the input, whatever the
number of workers: files in the order given, a JSONL file's non-blank lines, a parquet file's
rows, read one row group of the --json-keys columns at a time. A bad document stops the run with
"FILE:LINE: problem" (in parquet "FILE: row R (row group G): problem", counted from 0; a missing
or non-string column, or a damaged file, "FILE: problem") and leaves nothing under the output
prefix: files are written under temporary names and only renamed into place once every document
has been tokenized; those a killed run left behind are removed by the next. Long documents are
encoded --piece-chars characters at a time, with the ids of one whole encode, so memory does not
grow with the length of a document.
"""

import argparse
import contextlib
import os
import sys
import threading
import time
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from megatron.data.corpus_files import corpus_files, corpus_records
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype, remove_stale_temp_files
from megatron.data.jsonl import texts_of_line
from megatron.data.tokenizers import PIECE_CHARS, TOKENIZER_TYPES, build_tokenizer

# Documents per task sent to a worker: large enough to amortise inter-process overhead.
CHUNKSIZE = 32


class Encoder:
    """Turns one document (a raw JSONL line, or a parquet row's texts) into one token array per key."""

    def __init__(self, tokenizer_kwargs: dict, json_keys: list[str], append_eod: bool, dtype, piece_chars: int):
        self.tokenizer = build_tokenizer(**tokenizer_kwargs)
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.dtype = dtype
        self.piece_chars = piece_chars

    def encode(self, record: bytes | tuple[str, ...]) -> list[np.ndarray]:
        """Token arrays, one per json key; ValueError describing the problem for a bad line."""
        # A JSONL line is parsed here, in the worker, so that parsing runs in parallel too.
        texts = texts_of_line(record, self.json_keys) if isinstance(record, bytes) else record
        arrays = []
        for text in texts:
            # Each piece's ids go to the output dtype at once: as Python ints (36 bytes each) a long
            # document's ids would take 9-18x the memory of the array.
            pieces = [np.asarray(ids, dtype=self.dtype)
                      for ids in self.tokenizer.tokenize_pieces(text, self.piece_chars)]
            if self.append_eod:
                pieces.append(np.asarray([self.tokenizer.eod], dtype=self.dtype))
            arrays.append(np.concatenate(pieces))
        return arrays


# The encoder of this process, built once per worker by the Pool initializer.
_encoder = None


def _init_encoder(*encoder_args) -> None:
    global _encoder
    _encoder = Encoder(*encoder_args)


def _encode_located_record(located_record):
    """(location, token arrays or None, problem or None); errors travel back as values so the
    parent can name the document."""
    location, record = located_record
    try:
        return location, _encoder.encode(record), None
    except ValueError as e:
        return location, None, str(e)


class _BoundedFeed:
    """Lets at most `limit` documents be in flight. Pool.imap's feeder thread would otherwise read the
    whole input into memory ahead of the workers."""

    def __init__(self, items, limit: int):
        self._items = items
        self._slots = threading.Semaphore(limit)
        self._stopped = False

    def __iter__(self):
        for item in self._items:
            self._slots.acquire()
            if self._stopped:
                return
            yield item

    def consumed_one(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        """Unblock and end the feeder, so that terminating the pool cannot wait on it forever."""
        self._stopped = True
        self._slots.release()


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def preprocess(input_path: str | list[str], output_prefix: str, json_keys: list[str], tokenizer_kwargs: dict,
               append_eod: bool = False, workers: int = 1, log_interval: int = 100,
               piece_chars: int = PIECE_CHARS) -> dict:
    """Write one indexed dataset per key from the documents of `input_path` (one or more files,
    directories or globs); returns {key: (documents, tokens)}."""
    # Parallelism comes from worker processes; the library's own threads would only fight them
    # and warn after fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    inputs = [input_path] if isinstance(input_path, str) else list(input_path)
    corpus_name = " ".join(inputs)
    files = corpus_files(inputs)
    if all(os.path.getsize(path) == 0 for path in files):
        raise ValueError(f"{corpus_name}: empty corpus, no documents to tokenize")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    encoder_args = (tokenizer_kwargs, json_keys, append_eod, dtype, piece_chars)
    prefixes = {key: output_prefix_for_key(output_prefix, key) for key in json_keys}
    num_tokens = dict.fromkeys(json_keys, 0)
    removed = sum(remove_stale_temp_files(prefix + suffix)
                  for prefix in prefixes.values() for suffix in (".bin", ".idx"))
    if removed:
        print(f"removed {removed} temporary files a killed run left beside {output_prefix}", file=sys.stderr)
    num_documents = 0
    with contextlib.ExitStack() as stack:
        builders = {key: stack.enter_context(IndexedDatasetBuilder(prefixes[key] + ".bin", dtype))
                    for key in json_keys}
        records = corpus_records(files, json_keys)
        if workers > 1:
            pool = stack.enter_context(Pool(workers, initializer=_init_encoder, initargs=encoder_args))
            feed = _BoundedFeed(records, limit=4 * CHUNKSIZE * workers)
            stack.callback(feed.stop)  # runs before the pool is terminated
            # A reading error (a parquet file's) raised by the feed comes back from imap in order.
            results = pool.imap(_encode_located_record, feed, chunksize=CHUNKSIZE)
        else:
            feed = None
            _init_encoder(*encoder_args)
            results = map(_encode_located_record, records)

        progress = stack.enter_context(tqdm(desc=os.path.basename(inputs[0].rstrip(os.sep)), unit=" docs",
                                            file=sys.stderr))
        start = time.perf_counter()
        for location, arrays, problem in results:
            if problem is not None:
                raise ValueError(f"{location}: {problem}")
            if feed is not None:
                feed.consumed_one()
            for key, tokens in zip(json_keys, arrays):
                builders[key].add_document(tokens)
                num_tokens[key] += len(tokens)
            num_documents += 1
            if num_documents % log_interval == 0:
                progress.update(log_interval)
                rate = sum(num_tokens.values()) / max(time.perf_counter() - start, 1e-9)
                progress.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        progress.update(num_documents % log_interval)

        if num_documents == 0:
            raise ValueError(f"{corpus_name}: empty corpus, no documents to tokenize")
        for key, builder in builders.items():
            builder.finalize(prefixes[key] + ".idx")
    return {key: (num_documents, num_tokens[key]) for key in json_keys}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, nargs="+",
                       help="corpus files, read in the order given: JSONL (one JSON object per line), "
                            "*.parquet (needs pyarrow: pip install pyarrow), directories (their *.jsonl "
                            "and *.parquet files, sorted by name) or globs (their matches, sorted)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to tokenize (a parquet file's string columns), one dataset each")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="tokenizer.json or its directory")
    group.add_argument("--vocab-file", default=None)
    group.add_argument("--merge-file", default=None)
    group.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    group.add_argument("--piece-chars", type=int, default=PIECE_CHARS,
                       help="encode long documents this many characters at a time, to bound memory "
                            "(the ids are those of one whole encode); 0: whole documents")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document.bin/.idx for each json key")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=100, help="documents between progress updates")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    if args.piece_chars < 0:
        parser.error("--piece-chars must be 0 (whole documents) or positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer_kwargs = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                        "vocab_file": args.vocab_file, "merge_file": args.merge_file}
    try:
        counts = preprocess(args.input, args.output_prefix, args.json_keys, tokenizer_kwargs,
                            args.append_eod, args.workers, args.log_interval, args.piece_chars)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, (documents, tokens) in counts.items():
        print(f"{output_prefix_for_key(args.output_prefix, key)}.bin/.idx: "
              f"{documents} documents, {tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

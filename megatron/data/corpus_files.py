"""The files a corpus is given as, and their records in order.

An input is a file, a directory (its *.jsonl and *.parquet files, sorted by name, not recursing)
or a glob (its matches, sorted by name, each as if given alone). A file whose name ends in
.parquet is read as parquet (`megatron.data.parquet`, which needs pyarrow), any other as JSONL.
"""

import glob
import os

from megatron.data.jsonl import numbered_lines
from megatron.data.parquet import parquet_rows

CORPUS_SUFFIXES = (".jsonl", ".parquet")


def _files_of_path(path: str) -> list[str]:
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in sorted(os.listdir(path))
                 if name.endswith(CORPUS_SUFFIXES) and os.path.isfile(os.path.join(path, name))]
        if not files:
            raise ValueError(f"{path}: no *.jsonl or *.parquet files in this directory")
        return files
    if os.path.isfile(path):
        return [path]
    raise ValueError(f"{path}: input corpus not found")


def corpus_files(inputs: list[str]) -> list[str]:
    """The files named by `inputs`, in reading order; ValueError for an input naming none."""
    files = []
    for name in inputs:
        # A path that exists is taken as itself, even where its name holds glob characters.
        if os.path.exists(name) or glob.escape(name) == name:
            files += _files_of_path(name)
            continue
        matches = sorted(glob.glob(name))
        if not matches:
            raise ValueError(f"{name}: no files match")
        for match in matches:
            files += _files_of_path(match)
    return files


def corpus_records(files: list[str], keys: list[str]):
    """Yield (location, record) for every document of `files` in order: a JSONL file's records are
    its raw lines (parse them with `megatron.data.jsonl.texts_of_line`), a parquet file's the
    tuple of its strings under `keys`. `location` is what an error about the record starts with."""
    for path in files:
        if path.endswith(".parquet"):
            yield from parquet_rows(path, keys)
        else:
            yield from numbered_lines(path)

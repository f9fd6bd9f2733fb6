"""tools/preprocess_data.py on parquet files, directories and globs (megatron/data/parquet.py,
megatron/data/corpus_files.py): the bytes JSONL gives, bounded memory, errors naming the place."""

import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron.data.parquet import parquet_rows
# The JSONL corpus and its tokenizer are those fixtures' (imported, so that pytest finds them).
from tests.unit.test_preprocess_data import corpus, texts, tokenizer_dir  # noqa: F401
from tests.unit.test_preprocess_data import REPO_ROOT, file_bytes, run_preprocess, write_jsonl
from tools.preprocess_data import preprocess

DATASET_FILES = ["corpus_text_document.bin", "corpus_text_document.idx"]


def write_parquet(path, columns, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def damage_row_group(path, group, column):
    """Overwrite the first page header of one column chunk of one row group."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    with open(path, "r+b") as f:
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(b"\xff" * 32)


def dataset_bytes(directory):
    return [file_bytes(os.path.join(directory, name)) for name in DATASET_FILES]


@pytest.fixture(scope="module")
def jsonl_bytes(corpus, tokenizer_dir, tmp_path_factory):
    """What the JSONL corpus tokenizes to: what every parquet form of it must give."""
    prefix = tmp_path_factory.mktemp("jsonl") / "corpus"
    result = run_preprocess(corpus, str(prefix), tokenizer_dir, workers=1)
    assert result.returncode == 0, result.stderr
    return dataset_bytes(prefix.parent)


def test_parquet_shards_give_the_bytes_of_the_same_documents_as_jsonl(texts, tokenizer_dir, jsonl_bytes,
                                                                      tmp_path):
    """The JSONL corpus's documents in parquet files of several row groups, beside an extra
    column, read as a directory (sorted by name, other files ignored), as a glob and as files named
    one by one, with one worker and two."""
    shards = tmp_path / "shards"
    shards.mkdir()
    bounds = [0, 100, 101, 250, len(texts)]  # part-01 holds a single row
    # Written last to first, so that reading them in creation order would give another order.
    for i in reversed(range(len(bounds) - 1)):
        write_parquet(shards / f"part-{i:02d}.parquet",
                      {"id": list(range(bounds[i], bounds[i + 1])), "text": texts[bounds[i]:bounds[i + 1]]},
                      row_group_size=40)
    (shards / "README.md").write_text("not part of the corpus", encoding="utf-8")
    assert pq.ParquetFile(shards / "part-03.parquet").num_row_groups > 1

    named = [str(shards / f"part-{i:02d}.parquet") for i in range(len(bounds) - 1)]
    runs = [(str(shards), 1), (str(shards), 2), (str(shards / "part-*.parquet"), 2), (named, 1)]
    for n, (inputs, workers) in enumerate(runs):
        prefix = tmp_path / f"out{n}" / "corpus"
        result = run_preprocess(inputs, str(prefix), tokenizer_dir, workers)
        assert result.returncode == 0, (inputs, result.stderr)
        assert dataset_bytes(prefix.parent) == jsonl_bytes, (inputs, workers)
        assert sorted(os.listdir(prefix.parent)) == DATASET_FILES


def test_a_directory_may_mix_jsonl_and_parquet(texts, tokenizer_dir, jsonl_bytes, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_parquet(mixed / "a.parquet", {"text": texts[:50]})
    write_jsonl(mixed / "b.jsonl", [{"text": text} for text in texts[50:120]])
    write_parquet(mixed / "c.parquet", {"text": texts[120:]})
    prefix = tmp_path / "out" / "corpus"
    result = run_preprocess(str(mixed), str(prefix), tokenizer_dir, workers=2)
    assert result.returncode == 0, result.stderr
    assert dataset_bytes(prefix.parent) == jsonl_bytes


def _null_in_row_group_2(path):
    write_parquet(path, {"text": ["a"] * 10 + [None] + ["b"] * 3}, row_group_size=4)


def _damaged_row_group_1(path):
    write_parquet(path, {"text": [f"document {i}" for i in range(12)]}, row_group_size=4)
    damage_row_group(path, 1, column=0)


@pytest.mark.parametrize("write_bad, problem", [
    (lambda path: write_parquet(path, {"id": [1], "body": ["x"]}),
     "no column 'text'; columns present: id, body"),
    (lambda path: write_parquet(path, {"text": [1, 2]}), "column 'text' is int64, not a string"),
    (_null_in_row_group_2, "row 10 (row group 2): column 'text' is null"),
    (lambda path: path.write_text('{"text": "JSON, not parquet"}\n', encoding="utf-8"),
     "not a readable parquet file: "),
    (_damaged_row_group_1, "row group 1: cannot read: "),
], ids=["missing column", "not strings", "null", "not parquet", "damaged row group"])
def test_bad_parquet_fails_naming_the_file_and_leaves_nothing(texts, tokenizer_dir, tmp_path,
                                                               write_bad, problem):
    """The bad file comes second, so the workers are busy with the first's documents when the
    reader meets the problem."""
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    write_parquet(good, {"text": texts})
    write_bad(bad)
    output = tmp_path / "out"
    result = run_preprocess([str(good), str(bad)], str(output / "corpus"), tokenizer_dir, workers=2)
    assert result.returncode == 1
    assert f"error: {bad}: {problem}" in result.stderr
    assert os.listdir(output) == []


def test_a_null_fails_with_one_worker_too(tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.parquet"
    _null_in_row_group_2(bad)
    tokenizer_kwargs = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir}
    with pytest.raises(ValueError, match=re.escape(f"{bad}: row 10 (row group 2): column 'text' is null")):
        preprocess(str(bad), str(tmp_path / "out" / "corpus"), ["text"], tokenizer_kwargs)
    assert os.listdir(tmp_path / "out") == []


def test_inputs_that_name_no_file_are_clear_errors(tokenizer_dir, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("no corpus here", encoding="utf-8")
    tokenizer_kwargs = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir}
    for name, problem in [("missing.parquet", "input corpus not found"), ("*.parquet", "no files match"),
                          ("empty_dir", "no *.jsonl or *.parquet files in this directory")]:
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {problem}")):
            preprocess(str(tmp_path / name), str(tmp_path / "out" / "corpus"), ["text"], tokenizer_kwargs)


def test_only_the_needed_column_is_read_a_row_group_at_a_time(tmp_path):
    """A row group of the text column at a time: pyarrow's memory never holds the whole column,
    nor any of the larger column beside it (whose damaged row group is never met)."""
    rows, groups = 16, 16
    text = [f"{i:06d}" * 5_000 for i in range(rows * groups)]  # 30 kB each: 0.5 MB a row group, 7.7 in all
    other = [f"{i:06d}" * 30_000 for i in range(rows * groups)]  # 2.9 MB a row group
    path = tmp_path / "two_columns.parquet"
    write_parquet(path, {"other": other, "text": text}, row_group_size=rows)
    damage_row_group(path, 3, column=0)

    baseline = pa.total_allocated_bytes()
    peak, read = 0, []
    for location, row_texts in parquet_rows(str(path), ["text"], batch_rows=4):
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        read.append((location, row_texts))
    assert read == [(f"{path}: row {i} (row group {i // rows})", (t,)) for i, t in enumerate(text)]
    # pyarrow 26 peaks at 2.3 row groups: the compressed pages beside the decoded column.
    assert len(text[0]) <= peak < 4 * rows * len(text[0])

    # Reading the damaged column, the row groups before the damage come out first.
    rows_of_other = parquet_rows(str(path), ["other"], batch_rows=4)
    assert [next(rows_of_other)[1] for _ in range(3 * rows)] == [(o,) for o in other[:3 * rows]]
    with pytest.raises(ValueError, match=re.escape(f"{path}: row group 3: cannot read: ")):
        next(rows_of_other)


def run_without_pyarrow(*args):
    """The tool as a user without pyarrow runs it: None in sys.modules makes `import pyarrow` raise
    ImportError, as if it were not installed."""
    blocked_run = ("import runpy, sys; sys.modules['pyarrow'] = sys.modules['pyarrow.parquet'] = None; "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", blocked_run, "tools/preprocess_data.py", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_without_pyarrow_jsonl_works_and_parquet_says_how_to_install_it(corpus, tokenizer_dir,
                                                                        tmp_path):
    parquet_path = tmp_path / "corpus.parquet"
    write_parquet(parquet_path, {"text": ["a", "b"]})
    tokenizer_args = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    jsonl = run_without_pyarrow("--input", corpus, "--output-prefix", str(tmp_path / "jsonl" / "corpus"),
                                *tokenizer_args)
    assert jsonl.returncode == 0, jsonl.stderr
    parquet = run_without_pyarrow("--input", str(parquet_path), "--output-prefix",
                                  str(tmp_path / "parquet" / "corpus"), *tokenizer_args)
    assert parquet.returncode == 1
    assert f"error: {parquet_path}: reading parquet needs pyarrow: pip install pyarrow" in parquet.stderr
    assert os.listdir(tmp_path / "parquet") == []

"""tools/preprocess_data.py (run as a subprocess, as users run it) and tools/corpus_from_files.py."""

import collections
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.tokenizers import build_tokenizer
from tools.corpus_from_files import find_files, write_corpus
from tools.corpus_from_files import main as corpus_main
from tools.preprocess_data import preprocess
from tools.train_tokenizer import train_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_text(name):
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
        return f.read()


def write_jsonl(path, objects):
    with open(path, "w", encoding="utf-8") as f:
        for obj in objects:
            f.write(json.dumps(obj) + "\n")


@pytest.fixture(scope="module")
def texts():
    """Documents of very different lengths, an empty one and non-ASCII among them."""
    sources = [stdlib_text(name) for name in ("fnmatch.py", "heapq.py", "shlex.py", "bisect.py")]
    texts = sources + ["", "naïve café 日本語", "x"]
    # Enough small documents that two workers get many chunks of lines, more than may be in flight.
    texts += [source[i:i + 100] for source in sources for i in range(0, 8000, 100)]
    return texts


@pytest.fixture(scope="module")
def corpus(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_jsonl(path, [{"id": str(i), "text": text} for i, text in enumerate(texts)])
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, ["text"], 500, str(output))
    return str(output)


def run_preprocess(corpus, prefix, tokenizer_dir, workers, *extra_args):
    """`corpus`: one --input argument, or a list of them."""
    inputs = [corpus] if isinstance(corpus, str) else corpus
    return subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix", prefix,
         "--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", str(workers),
         "--log-interval", "10", *extra_args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_documents_are_tokenized_text_plus_eod(texts, corpus, tokenizer_dir, tmp_path):
    result = run_preprocess(corpus, str(tmp_path / "one" / "corpus"), tokenizer_dir, workers=1)
    assert result.returncode == 0, result.stderr
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    ds = IndexedDataset(str(tmp_path / "one" / "corpus_text_document"))
    assert ds.dtype == np.uint16
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tokenizer.tokenize(text) + [tokenizer.eod]

    result2 = run_preprocess(corpus, str(tmp_path / "two" / "corpus"), tokenizer_dir, workers=2)
    assert result2.returncode == 0, result2.stderr
    for suffix in (".bin", ".idx"):
        assert (file_bytes(tmp_path / "one" / f"corpus_text_document{suffix}")
                == file_bytes(tmp_path / "two" / f"corpus_text_document{suffix}"))
    assert sorted(os.listdir(tmp_path / "two")) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_documents_longer_than_a_piece_give_the_same_bytes(texts, tokenizer_dir, tmp_path):
    """--piece-chars 300 (most documents in many pieces) writes exactly what whole-document
    encodes (--piece-chars 0) write."""
    long_texts = ["".join(texts[:4]), "naïve café 日本語 🙂 e\u0301\r\n" * 300,
                  "x" + " " * 5000 + "y" + "\n" * 5000 + "z" * 5000]
    corpus = tmp_path / "long.jsonl"
    write_jsonl(corpus, [{"text": text} for text in long_texts + texts])
    whole = run_preprocess(str(corpus), str(tmp_path / "whole" / "corpus"), tokenizer_dir, 1, "--piece-chars", "0")
    assert whole.returncode == 0, whole.stderr
    pieces = run_preprocess(str(corpus), str(tmp_path / "pieces" / "corpus"), tokenizer_dir, 2,
                            "--piece-chars", "300")
    assert pieces.returncode == 0, pieces.stderr
    for suffix in (".bin", ".idx"):
        assert (file_bytes(tmp_path / "whole" / f"corpus_text_document{suffix}")
                == file_bytes(tmp_path / "pieces" / f"corpus_text_document{suffix}"))


@pytest.mark.parametrize("bad_line, problem", [
    ('{"text": "unterminated', "not a JSON object"),
    ('{"body": "no text here"}', "missing key 'text'"),
])
def test_bad_line_fails_naming_file_and_line_and_leaves_nothing(texts, tokenizer_dir, tmp_path,
                                                                 bad_line, problem):
    corpus = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": text}) for text in texts]
    # Early, so that the workers still have many lines queued when the error stops the run.
    lines.insert(3, bad_line)
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out"
    result = run_preprocess(str(corpus), str(output / "corpus"), tokenizer_dir, workers=2)
    assert result.returncode != 0
    assert f"{corpus}:4: {problem}" in result.stderr
    assert os.listdir(output) == []


def test_empty_corpus_is_a_clear_error(tokenizer_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    tokenizer_kwargs = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir}
    with pytest.raises(ValueError, match="empty corpus"):
        preprocess(str(empty), str(tmp_path / "out" / "corpus"), ["text"], tokenizer_kwargs)
    assert list(tmp_path.rglob("corpus*")) == []


def test_several_json_keys_give_one_dataset_each(tokenizer_dir, tmp_path):
    corpus = tmp_path / "two_keys.jsonl"
    write_jsonl(corpus, [{"title": "heapq", "text": stdlib_text("heapq.py")},
                         {"title": "bisect", "text": stdlib_text("bisect.py")}])
    tokenizer_kwargs = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir}
    counts = preprocess(str(corpus), str(tmp_path / "corpus"), ["title", "text"], tokenizer_kwargs)
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    titles = IndexedDataset(str(tmp_path / "corpus_title_document"))
    bodies = IndexedDataset(str(tmp_path / "corpus_text_document"))
    assert titles[1].tolist() == tokenizer.tokenize("bisect")  # no --append-eod
    assert tokenizer.detokenize(bodies[0]) == stdlib_text("heapq.py")
    assert counts["text"] == (2, int(bodies.sequence_lengths.sum()))


def test_corpus_from_files(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    (tree / "pkg" / "sub").mkdir(parents=True)
    files = {"b.py": "print('b')\n", "a.py": "# é\n", "pkg/__init__.py": "",
             "pkg/sub/deep.py": "x = 1\r\n"}
    for name, text in files.items():
        (tree / name).write_bytes(text.encode("utf-8"))
    (tree / "notes.txt").write_text("not matched", encoding="utf-8")
    (tree / "pkg" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))

    output = tmp_path / "corpus.jsonl"
    assert write_corpus(str(tree), "*.py", str(output)) == (4, 1)
    documents = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in documents] == sorted(files)
    assert {d["id"]: d["text"] for d in documents} == files
    first = output.read_bytes()

    # Stable: the same tree read again, from a different working directory, gives the same bytes.
    monkeypatch.chdir(tmp_path)
    assert corpus_main(["--input", "tree", "--output", "again.jsonl"]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == first

    assert write_corpus(str(tree), "*.py", str(output), max_files=2) == (2, 0)
    assert [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").splitlines()] == ["a.py", "b.py"]
    assert sorted(os.listdir(tmp_path)) == ["again.jsonl", "corpus.jsonl", "tree"]


def test_shuffled_corpus_is_a_seeded_sample_of_the_whole_tree(tmp_path):
    """--shuffle-seed: a fixed random order (so --split's contiguous valid range is a sample of the
    corpus, not its last packages), the same for the same seed; --max-files then keeps a random N."""
    def ids(path):
        return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]

    everything = [doc_id for doc_id, _ in find_files(STDLIB, "*.py")]
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert corpus_main(["--max-files", "200", "--shuffle-seed", "7", "--output", str(a)]) == 0
    assert corpus_main(["--max-files", "200", "--shuffle-seed", "7", "--output", str(b)]) == 0
    assert corpus_main(["--max-files", "200", "--shuffle-seed", "8", "--output", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert ids(a) != ids(c) and ids(a) != sorted(ids(a))
    assert len(set(ids(a))) == len(ids(a)) > 190  # a few stdlib test files are not UTF-8: skipped
    # Drawn from across the tree, not the first 200 ids (which end around "encodings/").
    assert max(ids(a)) > everything[len(everything) // 2] > min(ids(a))


def test_whole_directories_draws_each_top_level_directory_whole(tmp_path, capsys):
    """--whole-directories: every drawn directory but the last comes with all its files (a file's
    siblings sit in the corpus with it), in a seeded order that still mixes directories."""
    def ids(path):
        return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]

    tree = tmp_path / "tree"
    for directory in (f"model_{d}" for d in range(8)):  # 4 files each, one of them a level deeper
        (tree / directory / "sub").mkdir(parents=True)
        for i in range(3):
            (tree / directory / f"f{i}.py").write_text(f"# {directory} {i}\n", encoding="utf-8")
        (tree / directory / "sub" / "deep.py").write_text("x = 1\n", encoding="utf-8")
    (tree / "top.py").write_text("y = 2\n", encoding="utf-8")

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    args = ["--input", str(tree), "--whole-directories", "--max-files", "10", "--shuffle-seed", "3"]
    assert corpus_main(args + ["--output", str(a)]) == 0
    assert corpus_main(args + ["--output", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes() and len(ids(a)) == 10
    per_directory = collections.Counter(doc_id.split("/")[0] for doc_id in ids(a))
    # 10 files: two whole directories of 4 and 2 files of a third (or the lone top-level file).
    assert sorted(per_directory.values())[-2:] == [4, 4] and len(per_directory) <= 4
    # Written shuffled, not directory by directory.
    runs = sum(1 for x, y in zip(ids(a), ids(a)[1:]) if x.split("/")[0] != y.split("/")[0])
    assert runs > len(per_directory)

    # A random draw of the same size scatters over more directories.
    assert corpus_main(["--input", str(tree), "--max-files", "10", "--shuffle-seed", "3", "--output", str(b)]) == 0
    assert len({doc_id.split("/")[0] for doc_id in ids(b)}) > len(per_directory)

    with pytest.raises(SystemExit):
        corpus_main(["--input", str(tree), "--whole-directories", "--output", str(b)])
    assert "--whole-directories needs --shuffle-seed" in capsys.readouterr().err


def test_exclude_corpus_writes_a_datastore_disjoint_from_the_training_corpus(tmp_path, capsys):
    """--exclude-corpus: a separate retrieval datastore shares no file with the corpora named."""
    def ids(path):
        return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()}

    train, db = tmp_path / "train.jsonl", tmp_path / "db.jsonl"
    assert corpus_main(["--max-files", "50", "--shuffle-seed", "7", "--output", str(train)]) == 0
    assert corpus_main(["--exclude-corpus", str(train), "--max-files", "80", "--shuffle-seed", "7",
                        "--output", str(db)]) == 0
    assert len(ids(db)) == 80 and not ids(db) & ids(train)
    # Without the exclusion the same seed draws the training files first.
    assert corpus_main(["--max-files", "80", "--shuffle-seed", "7", "--output", str(db)]) == 0
    assert ids(train) <= ids(db)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no id"}\n', encoding="utf-8")
    assert corpus_main(["--exclude-corpus", str(bad), "--output", str(db)]) == 1
    assert f"{bad}:1" in capsys.readouterr().err


def test_corpus_from_files_defaults_to_the_stdlib(tmp_path, capsys):
    output = tmp_path / "stdlib.jsonl"
    assert corpus_main(["--max-files", "3", "--output", str(output)]) == 0
    ids = [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(ids) == 3 and ids == sorted(ids)
    assert json.loads(output.read_text(encoding="utf-8").splitlines()[0])["text"] == stdlib_text(ids[0])
    assert "wrote 3 documents" in capsys.readouterr().out
    # Installed packages live below the stdlib directory but are not part of the corpus.
    all_ids = [doc_id for doc_id, _ in find_files(STDLIB, "*.py")]
    assert "os.py" in all_ids
    assert not any("site-packages/" in doc_id for doc_id in all_ids)


def test_blank_lines_are_skipped_and_a_killed_runs_temporary_files_removed(tokenizer_dir, tmp_path):
    corpus = tmp_path / "blank.jsonl"
    corpus.write_text('{"text": "first"}\n\n   \n{"text": "second"}\n\n', encoding="utf-8")
    output = tmp_path / "out"
    output.mkdir()
    dead = output / "corpus_text_document.bin.999999999.0123abcd.tmp"  # no such process: kill -9 debris
    live = output / f"corpus_text_document.idx.{os.getpid()}.0123abcd.tmp"  # a running build's: kept
    dead.write_bytes(b"partial")
    live.write_bytes(b"in use")
    tokenizer_kwargs = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir}
    assert preprocess(str(corpus), str(output / "corpus"), ["text"], tokenizer_kwargs)["text"][0] == 2
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    ds = IndexedDataset(str(output / "corpus_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tokenizer.tokenize("first"), tokenizer.tokenize("second")]
    assert sorted(os.listdir(output)) == ["corpus_text_document.bin", "corpus_text_document.idx", live.name]

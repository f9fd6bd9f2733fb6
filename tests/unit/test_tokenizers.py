"""Tokenizers trained by tools/train_tokenizer.py and loaded by build_tokenizer."""

import hashlib
import json
import os
import re
import shutil
import sysconfig

import pytest

from megatron.data.tokenizers import EOD_TOKEN, build_tokenizer
from tools.train_tokenizer import train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "heapq.py"]
VOCAB_SIZE = 1000


def stdlib_text(name):
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
        return f.read()


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_jsonl(path, [stdlib_text(name) for name in TRAIN_FILES])
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, ["text"], VOCAB_SIZE, str(output))
    return str(output)


# Unseen in training: another module, plus non-ASCII, CRLF, tabs and runs of spaces.
ROUND_TRIP_TEXT = stdlib_text("difflib.py") + "\r\nnaïve café 日本語 🙂\t\t  x  \n\n"


def test_round_trip_is_exact(tokenizer_dir):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    ids = tokenizer.tokenize(ROUND_TRIP_TEXT)
    assert tokenizer.detokenize(ids) == ROUND_TRIP_TEXT
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    # The merges were learned: well under one token per character of source code.
    assert len(ids) < 0.6 * len(ROUND_TRIP_TEXT)


def test_vocab_size_and_eod(tokenizer_dir):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", os.path.join(tokenizer_dir, "tokenizer.json"))
    assert tokenizer.vocab_size == VOCAB_SIZE
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens"]
    assert [(t["content"], t["special"]) for t in added] == [(EOD_TOKEN, True)]
    assert tokenizer.eod == added[0]["id"]
    assert tokenizer.tokenize(EOD_TOKEN) == [tokenizer.eod]
    assert tokenizer.detokenize([tokenizer.eod]) == EOD_TOKEN


def test_training_is_deterministic(corpus, tokenizer_dir, tmp_path):
    again = train_tokenizer(corpus, ["text"], VOCAB_SIZE, str(tmp_path))
    with open(again, "rb") as a, open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()


def test_fingerprint_follows_the_file(tokenizer_dir, tmp_path):
    original = os.path.join(tokenizer_dir, "tokenizer.json")
    with open(original, "rb") as f:
        data = f.read()
    fingerprint = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir).fingerprint()
    assert fingerprint == hashlib.sha256(data).hexdigest()
    assert build_tokenizer("HuggingFaceTokenizer", original).fingerprint() == fingerprint

    changed = tmp_path / "tokenizer.json"
    config = json.loads(data)
    config["model"]["merges"] = config["model"]["merges"][:-1]
    changed.write_text(json.dumps(config), encoding="utf-8")
    assert build_tokenizer("HuggingFaceTokenizer", str(changed)).fingerprint() != fingerprint


def write_gpt2_files(tokenizer_dir, directory):
    """vocab.json + merges.txt (GPT-2's file formats) from the trained BPE model."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    vocab_file = os.path.join(directory, "vocab.json")
    merge_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(merge_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in model["merges"]:
            f.write((" ".join(merge) if isinstance(merge, list) else merge) + "\n")
    return vocab_file, merge_file


def test_gpt2_bpe_from_vocab_and_merges(tokenizer_dir, tmp_path):
    vocab_file, merge_file = write_gpt2_files(tokenizer_dir, tmp_path)
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    ids = gpt2.tokenize(ROUND_TRIP_TEXT)
    assert gpt2.detokenize(ids) == ROUND_TRIP_TEXT
    # Same vocabulary and merges, same byte-level BPE: the same ids.
    assert ids == hf.tokenize(ROUND_TRIP_TEXT)
    assert (gpt2.vocab_size, gpt2.eod) == (hf.vocab_size, hf.eod)

    fingerprint = gpt2.fingerprint()
    with open(merge_file, encoding="utf-8") as f:
        lines = f.readlines()
    with open(merge_file, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])
    changed = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert changed.fingerprint() != fingerprint


def test_errors_name_the_problem(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_dir)
    missing = str(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(ValueError, match="not found") as error:
        build_tokenizer("HuggingFaceTokenizer", missing)
    assert missing in str(error.value)

    # A vocabulary without the end-of-document token.
    config_path = os.path.join(tokenizer_dir, "tokenizer.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["added_tokens"] = []
    eod_id = config["model"]["vocab"].pop(EOD_TOKEN)
    config["model"]["vocab"]["<|placeholder|>"] = eod_id
    no_eod = tmp_path / "no_eod.json"
    no_eod.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="endoftext") as error:
        build_tokenizer("HuggingFaceTokenizer", str(no_eod))
    assert str(no_eod) in str(error.value)


def test_train_tokenizer_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: missing key 'text'")):
        train_tokenizer(str(bad), ["text"], VOCAB_SIZE, str(tmp_path / "out"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(str(empty), ["text"], VOCAB_SIZE, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer(str(bad), ["text"], 100, str(tmp_path / "out"))


def test_fingerprint_is_about_content_not_location(tokenizer_dir, tmp_path):
    """The fingerprint is about content, not location: a copied tokenizer is the same one."""
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    assert (build_tokenizer("HuggingFaceTokenizer", str(tmp_path)).fingerprint()
            == build_tokenizer("HuggingFaceTokenizer", tokenizer_dir).fingerprint())

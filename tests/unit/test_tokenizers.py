"""Tokenizers trained by tools/train_tokenizer.py and loaded by build_tokenizer."""

import hashlib
import json
import os
import random
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


def test_a_hf_directory_without_endoftext_ends_documents_with_its_eos_token(tokenizer_dir, tmp_path):
    """Llama-3's vocabulary has no <|endoftext|>: its tokenizer_config.json names the eos."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        config = json.load(f)
    eod_id = config["model"]["vocab"].pop(EOD_TOKEN)
    config["model"]["vocab"]["<|end_of_text|>"] = eod_id
    for token in config["added_tokens"]:
        if token["content"] == EOD_TOKEN:
            token["content"] = "<|end_of_text|>"
    model_dir = tmp_path / "hf_model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="endoftext"):  # no tokenizer_config.json to name another
        build_tokenizer("HuggingFaceTokenizer", str(model_dir))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|end_of_text|>", "special": True}}), encoding="utf-8")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(model_dir))
    assert tokenizer.eod == eod_id
    assert tokenizer.detokenize([tokenizer.eod]) == "<|end_of_text|>"


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


def joined(pieces):
    return [i for ids in pieces for i in ids]


_LETTERS = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10_000))
_NON_ASCII = "naïve café 日本語 🙂🙂 Ελληνικά e\u0301 👩‍👩‍👧 ÿ\r\n\t" * 200
# Longer than the pieces the tests use: source code (many pre-tokens), multi-byte characters that
# byte-level BPE splits into several tokens sharing one character's offsets, and single pre-tokens
# far longer than a piece.
LONG_TEXTS = {
    "stdlib source": "".join(stdlib_text(name) for name in ("difflib.py", "argparse.py")),
    "non-ASCII": _NON_ASCII,
    "5,000 spaces": " " * 5000,
    "5,000 newlines": "\n" * 5000,
    "10,000-letter word": _LETTERS,
    "10,000 times a": "a" * 10_000,
    "mixed": (stdlib_text("textwrap.py") + " " * 5000 + "x" + "\n" * 5000 + _LETTERS + "\t" * 3000
              + _NON_ASCII[:3000] + "it's, we're, they'll " * 200 + EOD_TOKEN + stdlib_text("heapq.py")),
}


@pytest.mark.parametrize("name", LONG_TEXTS)
@pytest.mark.parametrize("piece_chars", [100, 300, 2000])
def test_pieces_give_the_ids_of_one_whole_encode(tokenizer_dir, name, piece_chars):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    text = LONG_TEXTS[name]
    pieces = list(tokenizer.tokenize_pieces(text, piece_chars))
    assert joined(pieces) == tokenizer.tokenize(text)
    if name in ("stdlib source", "non-ASCII"):
        # Really split, not one encode after every piece was refused (some are, and encoded again
        # longer: in pieces this small the overlap is a few characters).
        assert len(pieces) > len(text) / (8 * piece_chars)


def test_pieces_of_gpt2_bpe_and_of_short_texts(tokenizer_dir, tmp_path):
    vocab_file, merge_file = write_gpt2_files(tokenizer_dir, tmp_path)
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    text = LONG_TEXTS["mixed"]
    assert joined(gpt2.tokenize_pieces(text, 500)) == gpt2.tokenize(text)
    assert list(gpt2.tokenize_pieces(text, 0)) == [gpt2.tokenize(text)]
    assert list(gpt2.tokenize_pieces("short", 500)) == [gpt2.tokenize("short")]
    assert list(gpt2.tokenize_pieces("", 500)) == [[]]
    with pytest.raises(ValueError, match="piece_chars"):
        next(gpt2.tokenize_pieces(text, -1))


def test_pieces_that_disagree_are_encoded_again_longer(tokenizer_dir, tmp_path):
    """With a prefix space added to every encode, a piece restarting at a pre-token without a
    leading space tokenizes it differently: only the check against the previous piece's overlap
    (the margin alone would not) keeps the ids those of one whole encode."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    text = LONG_TEXTS["stdlib source"]
    whole = tokenizer.tokenize(text)
    for piece_chars in (300, 2000):
        pieces = list(tokenizer.tokenize_pieces(text, piece_chars))
        assert joined(pieces) == whole
        assert len(pieces) > len(text) / (8 * piece_chars)

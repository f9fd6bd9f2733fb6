"""Data that changed under a work dir, and token ids outside the vocabulary, are refused at
start-up naming the file."""

import errno
import json
import os
import sysconfig
import tempfile

import numpy as np
import pytest

from megatron.data.builder import check_token_ids, max_token_cache_path
from megatron.data.indexed_dataset import (FINGERPRINT_PAGE_BYTES, FINGERPRINT_PAGES, IndexedDataset,
                                           IndexedDatasetBuilder, content_fingerprint)
from megatron.data.tokenizers import build_tokenizer
from megatron.retrieval.neighbors import load_neighbors
from megatron.retrieval.tasks import describe_build
from megatron.retrieval.workdir import WorkDir, write_json
from megatron.training import retro_config, retro_data
from megatron.training.arguments import parse_args
from pretrain_gpt import main as pretrain_gpt
from tools.preprocess_data import preprocess
from tools.retro.preprocess_data import parse_args as parse_build_args
from tools.train_tokenizer import train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and an indexed dataset tokenized with it (a few stdlib files)."""
    root = tmp_path_factory.mktemp("integrity")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for name in ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "glob.py"):
            with open(os.path.join(STDLIB, name), encoding="utf-8") as src:
                f.write(json.dumps({"text": src.read()[:3000]}) + "\n")
    train_tokenizer(str(root / "corpus.jsonl"), ["text"], 400, str(root / "tok"))
    tokenizer_args = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(root / "tok")}
    preprocess(str(root / "corpus.jsonl"), str(root / "data"), ["text"], tokenizer_args, append_eod=True)
    return {"root": root, "tok": str(root / "tok"), "prefix": str(root / "data_text_document")}


def common_args(data, prefix=None):
    return ["--data-path", prefix or data["prefix"], "--split", "80,20,0", "--seq-length", "32", "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", data["tok"], "--train-iters", "4",
            "--global-batch-size", "2", "--eval-iters", "0"]


def built_work_dir(data, name, prefix=None):
    """A work dir's config.json as its build writes it first (the tasks themselves are not run)."""
    wd = data["root"] / name
    args = parse_build_args(["--retro-work-dir", str(wd), "--retro-gpt-chunk-length", "16",
                             *common_args(data, prefix)])
    write_json(WorkDir(str(wd)).config, describe_build(args, build_tokenizer("HuggingFaceTokenizer", data["tok"])))
    return wd


def training_config(data, wd, prefix=None):
    return parse_args(["--retro-add-retriever", "--retro-work-dir", str(wd), "--micro-batch-size", "2",
                       "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                       *common_args(data, prefix)],
                      extra_args_provider=retro_config.add_retro_args,
                      extra_config_provider=retro_config.retro_config_from_args)


def rewrite_tokens_in_place(prefix, vocab_size, start=0, stop=None):
    """What the audit did: other token values, same sizes (the .idx is untouched)."""
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    tokens[start:stop] = (tokens[start:stop] + 1) % vocab_size
    tokens.tofile(prefix + ".bin")


def test_data_changed_in_place_under_a_work_dir_is_refused_naming_the_file(data, tmp_path):
    wd = built_work_dir(data, "wd_fingerprint")
    recorded = json.loads((wd / "config.json").read_text())["dataset_fingerprints"]
    assert recorded == {data["prefix"]: content_fingerprint(data["prefix"])}
    retro_data.prepare(training_config(data, wd))  # training (and evaluate.py) start: unchanged data passes

    original = open(data["prefix"] + ".bin", "rb").read()
    try:
        rewrite_tokens_in_place(data["prefix"], 400)
        with pytest.raises(ValueError, match=f"{data['prefix']}.bin .*content changed since the retro work dir"):
            retro_data.prepare(training_config(data, wd))
    finally:
        with open(data["prefix"] + ".bin", "wb") as f:
            f.write(original)


def write_dataset(prefix, *documents):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for tokens in documents:
        builder.add_document(tokens)
    builder.finalize(prefix + ".idx")


def test_fingerprint_of_a_large_bin_catches_what_its_docstring_promises(tmp_path):
    """Past FINGERPRINT_PAGES pages only sampled pages are read: a rewrite longer than the
    spacing between them is caught wherever it lies, a one-token edit between them is not."""
    prefix = str(tmp_path / "big")
    num_tokens = 3 * FINGERPRINT_PAGES * FINGERPRINT_PAGE_BYTES // 2  # ~3 pages between samples
    write_dataset(prefix, np.arange(num_tokens) % 1000)
    before = content_fingerprint(prefix)
    longer_than_spacing = num_tokens // (FINGERPRINT_PAGES - 1) + FINGERPRINT_PAGE_BYTES // 2
    for start in (0, num_tokens // 3 + 123, num_tokens - longer_than_spacing):
        write_dataset(prefix, np.arange(num_tokens) % 1000)
        rewrite_tokens_in_place(prefix, 1000, start, start + longer_than_spacing)
        assert content_fingerprint(prefix) != before, start
    write_dataset(prefix, np.arange(num_tokens) % 1000)
    assert content_fingerprint(prefix) == before
    page_2 = 2 * FINGERPRINT_PAGE_BYTES // 2  # a token of page 2, between sampled pages 0 and 3
    rewrite_tokens_in_place(prefix, 1000, page_2, page_2 + 1)
    assert content_fingerprint(prefix) == before


def test_token_ids_outside_the_vocabulary_are_refused_at_start_up_naming_the_file(data, tmp_path):
    vocab = build_tokenizer("HuggingFaceTokenizer", data["tok"]).vocab_size
    tokens = np.fromfile(data["prefix"] + ".bin", dtype=np.uint16)
    inside, outside = str(data["root"] / "inside"), str(data["root"] / "outside")
    write_dataset(inside, np.append(tokens, vocab - 1))
    check_token_ids([inside], vocab, data["tok"])
    write_dataset(outside, np.insert(tokens, 7, vocab))  # e.g. tokenized with a larger tokenizer
    message = f"{outside}.bin: holds token id {vocab}, outside the vocabulary of {vocab} tokens of the tokenizer"
    with pytest.raises(ValueError, match=message):
        pretrain_gpt(["--micro-batch-size", "2", "--num-layers", "1", "--hidden-size", "16",
                      "--num-attention-heads", "2", "--data-cache-path", str(tmp_path),
                      *common_args(data, outside)])
    assert os.path.isfile(max_token_cache_path(outside, str(tmp_path)))  # --data-cache-path reaches it
    wd = built_work_dir(data, "wd_vocab", outside)
    with pytest.raises(ValueError, match=message):
        retro_data.prepare(training_config(data, wd, outside))


VOCAB = 1000
REFUSED = "{}.bin: holds token id 1000, outside the vocabulary of 1000 tokens"


@pytest.fixture
def scans(monkeypatch):
    """The prefixes whose .bin IndexedDataset.max_token read whole, in order."""
    calls = []
    scan = IndexedDataset.max_token

    def counted(self):
        calls.append(self.path_prefix)
        return scan(self)
    monkeypatch.setattr(IndexedDataset, "max_token", counted)
    return calls


def test_the_largest_token_id_is_scanned_once_then_read_from_the_cache(tmp_path, scans):
    inside, outside, cache = str(tmp_path / "inside"), str(tmp_path / "outside"), str(tmp_path / "elsewhere")
    write_dataset(inside, np.arange(VOCAB))
    write_dataset(outside, np.append(np.arange(50), VOCAB))
    for _ in range(2):
        check_token_ids([inside], VOCAB, "tok", cache)
        with pytest.raises(ValueError, match=REFUSED.format(outside)):
            check_token_ids([outside], VOCAB, "tok", cache)
    assert scans == [inside, outside]  # the second start refused from the cached value
    assert os.path.isfile(max_token_cache_path(inside, cache))
    with pytest.raises(ValueError, match=f"{inside}.bin: holds token id 999, outside the vocabulary of 999 "):
        check_token_ids([inside], VOCAB - 1, "tok", cache)  # the cached id meets each run's vocabulary
    # Without --data-cache-path it sits with the GPT index caches, <dir of the prefix>/cache.
    check_token_ids([inside], VOCAB, "tok")
    assert os.path.dirname(max_token_cache_path(inside)) == str(tmp_path / "cache")
    assert os.path.isfile(max_token_cache_path(inside)) and scans == [inside, outside, inside]


def big_tokens():
    """More than FINGERPRINT_PAGES pages, so only sampled pages of the .bin are fingerprinted."""
    return np.arange(3 * FINGERPRINT_PAGES * FINGERPRINT_PAGE_BYTES // 2) % VOCAB


UNSAMPLED = FINGERPRINT_PAGE_BYTES  # this uint16 token lies in page 2, between sampled pages 0 and 3


def test_an_out_of_range_id_in_a_sampled_page_is_rescanned_and_refused(tmp_path, scans):
    prefix, cache, tokens = str(tmp_path / "big"), str(tmp_path / "cache"), big_tokens()
    write_dataset(prefix, tokens)
    check_token_ids([prefix], VOCAB, "tok", cache)
    tokens[5] = VOCAB  # in page 0; same size, same .idx
    tokens.astype(np.uint16).tofile(prefix + ".bin")
    with pytest.raises(ValueError, match=REFUSED.format(prefix)):
        check_token_ids([prefix], VOCAB, "tok", cache)
    assert scans == [prefix, prefix]


def test_another_idx_over_the_same_bin_is_rescanned_an_edit_between_sampled_pages_is_not(tmp_path, scans):
    """The cache sees what content_fingerprint sees, no more (check_token_ids' docstring)."""
    prefix, cache, tokens = str(tmp_path / "big"), str(tmp_path / "cache"), big_tokens()
    write_dataset(prefix, tokens)
    check_token_ids([prefix], VOCAB, "tok", cache)
    tokens[UNSAMPLED] = VOCAB
    tokens.astype(np.uint16).tofile(prefix + ".bin")
    check_token_ids([prefix], VOCAB, "tok", cache)  # missed: the cached value still stands
    assert scans == [prefix]
    write_dataset(prefix, tokens[:1000], tokens[1000:])  # the same .bin bytes in two documents
    with pytest.raises(ValueError, match=REFUSED.format(prefix)):
        check_token_ids([prefix], VOCAB, "tok", cache)
    assert scans == [prefix, prefix]


# FP: the dataset's own fingerprint. '\udcff' is written as the byte 0xff, which is not UTF-8.
@pytest.mark.parametrize("damage", ['', '{"fingerprint": ', '\udcff', '[1, 2]', '{"fingerprint": "FP"}',
                                    '{"fingerprint": "FP", "max_token": "1"}',
                                    '{"fingerprint": "FP", "max_token": true}',
                                    '{"fingerprint": "sha256-sampled:00", "max_token": 1}'])
def test_a_damaged_cache_file_is_not_trusted_and_is_rewritten(tmp_path, scans, damage):
    prefix, cache = str(tmp_path / "outside"), str(tmp_path / "cache")
    write_dataset(prefix, np.append(np.arange(50), VOCAB))
    path = max_token_cache_path(prefix, cache)
    os.makedirs(cache)
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(damage.replace("FP", content_fingerprint(prefix)))
    with pytest.raises(ValueError, match=REFUSED.format(prefix)):
        check_token_ids([prefix], VOCAB, "tok", cache)
    assert scans == [prefix]
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"path_prefix": prefix, "fingerprint": content_fingerprint(prefix),
                                "max_token": VOCAB}


def test_a_read_only_cache_dir_is_read_and_otherwise_costs_a_scan_per_start(tmp_path, scans, monkeypatch,
                                                                             capsys):
    inside, outside, cache = str(tmp_path / "inside"), str(tmp_path / "outside"), tmp_path / "cache"
    write_dataset(inside, np.arange(VOCAB))
    write_dataset(outside, np.append(np.arange(50), VOCAB))
    check_token_ids([inside], VOCAB, "tok", str(cache))
    cache.chmod(0o555)

    # Root ignores the mode bits: refuse the write as the kernel does for anyone else.
    def refused_write(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refused_write)
    try:
        for _ in range(2):
            check_token_ids([inside], VOCAB, "tok", str(cache))
            with pytest.raises(ValueError, match=REFUSED.format(outside)):
                check_token_ids([outside], VOCAB, "tok", str(cache))
    finally:
        cache.chmod(0o755)
    assert scans == [inside, outside, outside]
    assert os.listdir(cache) == [os.path.basename(max_token_cache_path(inside, str(cache)))]
    assert f"cannot cache the largest token id of {outside}.bin" in capsys.readouterr().out


def test_a_truncated_or_foreign_neighbour_file_is_named(tmp_path):
    wd = WorkDir(str(tmp_path))
    os.makedirs(wd.neighbors_dir)
    np.save(wd.neighbors("train"), np.zeros((50, 4, 2), dtype=np.int64))
    assert load_neighbors(wd.root, "train").shape == (50, 4, 2)
    with open(wd.neighbors("train"), "r+b") as f:
        f.truncate(os.path.getsize(wd.neighbors("train")) // 2)
    with pytest.raises(ValueError, match=f"{wd.neighbors('train')}: damaged neighbour file"):
        load_neighbors(wd.root, "train")
    np.save(wd.neighbors("train"), np.zeros((50, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=f"{wd.neighbors('train')}: expected int64"):
        load_neighbors(wd.root, "train")

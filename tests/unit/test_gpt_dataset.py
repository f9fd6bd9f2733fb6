"""GPT dataset, blending, builder and pretraining sampler.

Corpora are written by the tests: token = 1000 * document id + position in the document, so every
token names its document and place, and a sample's provenance can be read off its tokens.
"""

import collections
import math
import os

import numpy as np
import pytest
import torch

from megatron.data import gpt_dataset
from megatron.data.blended_dataset import BlendedDataset, parse_data_path
from megatron.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.loader import build_data_loader

SEQ = 16


def doc_tokens(doc_id, length):
    return 1000 * doc_id + np.arange(length)


def write_corpus(tmp_path, name, lengths):
    """An indexed dataset at tmp_path/name with one document per entry of `lengths`."""
    prefix = str(tmp_path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc_id, length in enumerate(lengths):
        builder.add_document(doc_tokens(doc_id, length))
    builder.finalize(prefix + ".idx")
    return prefix, IndexedDataset(prefix)


def random_lengths(n, seed, low=1, high=60):
    return np.random.default_rng(seed).integers(low, high, size=n).tolist()


def stream_of(ds):
    """The dataset's token stream: its documents in doc_idx order, concatenated."""
    return np.concatenate([ds.indexed_dataset[int(d)] for d in ds.doc_idx]).astype(np.int64)


def megatron_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """A line-by-line port of Megatron-LM's build_sample_idx (helpers.cpp), the reference."""
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_idx_index, doc_offset = 0, 0
    for sample in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        out[sample] = (doc_idx_index, doc_offset)
    return out


def test_parse_split_and_ranges():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("8/2") == pytest.approx([0.8, 0.2, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)
    assert split_document_ranges([0.8, 0.1, 0.1], 100) == [(0, 80), (80, 90), (90, 100)]
    # Rounding error is taken off the later boundaries: 3 * round(3.33) = 9 -> +1 on train.
    assert split_document_ranges([1 / 3] * 3, 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_document_ranges(parse_split("969,30,1"), 20) == [(0, 19), (19, 20), (20, 20)]


def test_parse_data_path():
    assert parse_data_path(["a"]) == [(1.0, "a")]
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    with pytest.raises(ValueError, match="not a number"):
        parse_data_path(["x", "a", "0.7", "b"])
    with pytest.raises(ValueError, match="pairs"):
        parse_data_path(["0.3", "a", "b"])


def test_one_epoch_labels_every_token_once_and_matches_megatron(tmp_path):
    lengths = random_lengths(40, seed=0)
    # Make the split's token count T satisfy (T - 1) % SEQ == 0: one epoch then covers every token.
    lengths[-1] += (1 - sum(lengths)) % SEQ
    prefix, indexed = write_corpus(tmp_path, "corpus", lengths)
    documents = np.arange(len(lengths))
    num_samples = (sum(lengths) - 1) // SEQ
    ds = GPTDataset(indexed, prefix, documents, num_samples, SEQ, seed=1, split_name="train")
    assert len(ds) == num_samples
    assert sorted(ds.doc_idx.tolist()) == documents.tolist()  # one epoch: each document once

    stream = stream_of(ds)
    assert len(stream) == num_samples * SEQ + 1
    labels = collections.Counter()
    for i in range(len(ds)):
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (SEQ + 1,)
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(text, stream[j * SEQ: j * SEQ + SEQ + 1])
        labels.update(text[1:].tolist())
    all_tokens = collections.Counter(np.concatenate([doc_tokens(d, n) for d, n in enumerate(lengths)]).tolist())
    all_tokens[int(stream[0])] -= 1
    assert labels == +all_tokens
    assert sorted(ds.shuffle_idx.tolist()) == list(range(num_samples))
    assert ds.shuffle_idx.tolist() != list(range(num_samples))

    reference = megatron_sample_idx(np.array(lengths), ds.doc_idx, SEQ, num_samples)
    np.testing.assert_array_equal(ds.sample_idx, reference)


def test_epochs_and_split_boundaries(tmp_path):
    lengths = random_lengths(50, seed=2)
    prefix, indexed = write_corpus(tmp_path, "corpus", lengths)
    ranges = split_document_ranges(parse_split("6,2,2"), len(lengths))
    for split_name, (start, end) in zip(("train", "valid", "test"), ranges):
        documents = np.arange(start, end)
        tokens_per_epoch = sum(lengths[start:end])
        num_samples = (7 * tokens_per_epoch) // (2 * SEQ)  # 3.5 epochs
        ds = GPTDataset(indexed, prefix, documents, num_samples, SEQ, seed=3, split_name=split_name)
        num_epochs = len(ds.doc_idx) // len(documents)
        assert num_epochs == 4
        for e in range(num_epochs):  # each epoch is its own permutation of the split
            epoch = ds.doc_idx[e * len(documents):(e + 1) * len(documents)]
            assert sorted(epoch.tolist()) == documents.tolist()
        reference = megatron_sample_idx(np.array(lengths), ds.doc_idx, SEQ, num_samples)
        np.testing.assert_array_equal(ds.sample_idx, reference)
        # Samples within the first 3 epochs are served before those reaching into the 4th.
        full = (3 * tokens_per_epoch - 1) // SEQ
        assert sorted(ds.shuffle_idx[:full].tolist()) == list(range(full))
        assert sorted(ds.shuffle_idx[full:].tolist()) == list(range(full, num_samples))

        stream = stream_of(ds)
        for i in range(len(ds)):
            text = ds[i]["text"]
            doc_ids = ds.get_document_ids(i)
            j = int(ds.shuffle_idx[i])
            np.testing.assert_array_equal(text, stream[j * SEQ: j * SEQ + SEQ + 1])
            np.testing.assert_array_equal(doc_ids, text // 1000)  # tokens name their document
            assert ((doc_ids >= start) & (doc_ids < end)).all(), f"{split_name} sample {i} left its split"


def test_get_document_ids_matches_naive_walk(tmp_path):
    lengths = [1, 1, 40, 3, 1, 17, 16, 2, 33, 1, 5]
    prefix, indexed = write_corpus(tmp_path, "corpus", lengths)
    documents = np.arange(len(lengths))
    ds = GPTDataset(indexed, prefix, documents, 30, SEQ, seed=4)
    # Naive: list the document id of every stream token, then cut samples out of that list.
    owner = []
    for d in ds.doc_idx:
        owner.extend([int(d)] * lengths[int(d)])
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        assert ds.get_document_ids(i).tolist() == owner[j * SEQ: j * SEQ + SEQ + 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_index_cache_is_reused_and_keyed_by_seed(tmp_path, monkeypatch):
    prefix, indexed = write_corpus(tmp_path, "corpus", random_lengths(30, seed=5))
    documents = np.arange(30)
    first = GPTDataset(indexed, prefix, documents, 50, SEQ, seed=7)
    cache_dir = tmp_path / "cache"  # default: next to the data
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 4 and all(f.startswith(first.cache_key) for f in files)
    mtimes = {f: os.stat(cache_dir / f).st_mtime_ns for f in files}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(gpt_dataset, "build_gpt_index", no_rebuild)
    again = GPTDataset(indexed, prefix, documents, 50, SEQ, seed=7)
    assert isinstance(again.sample_idx, np.memmap)
    assert {f: os.stat(cache_dir / f).st_mtime_ns for f in files} == mtimes
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i]["text"], again[i]["text"])

    monkeypatch.undo()
    other = GPTDataset(indexed, prefix, documents, 50, SEQ, seed=8)
    assert other.cache_key != first.cache_key
    assert len(os.listdir(cache_dir)) == 8
    assert not np.array_equal(other.shuffle_idx, first.shuffle_idx)
    assert not any(f.endswith(".tmp") for f in os.listdir(cache_dir))


def test_blend_proportions(tmp_path):
    weights = [0.2, 0.3, 0.5]
    size = 10_000
    children = []
    for k, w in enumerate(weights):
        lengths = random_lengths(20, seed=10 + k)
        prefix, indexed = write_corpus(tmp_path, f"corpus{k}", lengths)
        children.append(GPTDataset(indexed, prefix, np.arange(20), math.ceil(w * size * 1.005), 4, seed=k))
    blend = BlendedDataset(children, [2, 3, 5], size, seed=0, cache_dir=str(tmp_path / "cache"))
    assert len(blend) == size
    index = np.asarray(blend.dataset_index)
    for n in (100, 1000, size):  # every prefix of the blend follows the weights
        shares = np.bincount(index[:n], minlength=3) / n
        np.testing.assert_allclose(shares, weights, atol=0.01)
    # The k-th sample taken from a child is that child's sample k.
    for d in range(3):
        assert blend.dataset_sample_index[index == d].tolist() == list(range(int((index == d).sum())))
    for i in (0, 1, 2, 777, size - 1):
        d, j = int(index[i]), int(blend.dataset_sample_index[i])
        item = blend[i]
        assert item["dataset_id"] == d
        np.testing.assert_array_equal(item["text"], children[d][j]["text"])
        np.testing.assert_array_equal(blend.get_document_ids(i), children[d].get_document_ids(j))
    with pytest.raises(ValueError, match="only"):
        BlendedDataset(children, [0.9, 0.05, 0.05], size, seed=0, cache_dir=str(tmp_path / "cache"))


def test_build_gpt_datasets_single_and_blend(tmp_path):
    from megatron.data.builder import build_gpt_datasets
    from megatron.data.config import DataConfig

    prefix_a, _ = write_corpus(tmp_path, "a", random_lengths(40, seed=20))
    prefix_b, _ = write_corpus(tmp_path, "b", random_lengths(40, seed=21))
    single = DataConfig(data_path=[prefix_a], split="8,2,0")
    train, valid, test = build_gpt_datasets(single, SEQ, (100, 10, 5), seed=1)
    assert isinstance(train, GPTDataset) and (len(train), len(valid), test) == (100, 10, None)
    assert train[0]["dataset_id"] == 0
    assert set(np.concatenate([train.get_document_ids(i) for i in range(100)]).tolist()) <= set(range(32))
    again = build_gpt_datasets(single, SEQ, (100, 10, 5), seed=1)[0]
    np.testing.assert_array_equal(train[5]["text"], again[5]["text"])

    default_cache = sorted(os.listdir(tmp_path / "cache"))  # <dir of prefix>/cache
    cache = str(tmp_path / "elsewhere")
    blend_cfg = DataConfig(data_path=["0.25", prefix_a, "0.75", prefix_b], split="8,2,0", data_cache_path=cache)
    train, valid, test = build_gpt_datasets(blend_cfg, SEQ, (400, 40, 0), seed=1)
    assert isinstance(train, BlendedDataset) and test is None
    assert [len(d) for d in train.datasets] == [math.ceil(0.25 * 400 * 1.005), math.ceil(0.75 * 400 * 1.005)]
    assert [d.split_name for d in valid.datasets] == ["valid", "valid"]
    assert np.bincount(np.asarray(train.dataset_index)).tolist() == [100, 300]
    assert sorted(os.listdir(tmp_path / "cache")) == default_cache  # --data-cache-path was used
    assert any("BlendedDataset" in f for f in os.listdir(cache))
    assert build_gpt_datasets(blend_cfg, SEQ, (400, 40, 4), seed=1)[2] is None  # no test documents at all

    # A blend whose split is empty in one prefix only cannot honour the weights: refused.
    prefix_c, _ = write_corpus(tmp_path, "c", [20, 20, 20, 20])  # "8,1,1" of 4 documents: all train
    partial = DataConfig(data_path=["0.5", prefix_a, "0.5", prefix_c], split="8,1,1")
    with pytest.raises(ValueError, match="c: the valid split"):
        build_gpt_datasets(partial, SEQ, (10, 5, 0), seed=1)


def test_sampler_resume_and_data_parallel(tmp_path):
    prefix, indexed = write_corpus(tmp_path, "corpus", random_lengths(30, seed=30))
    ds = GPTDataset(indexed, prefix, np.arange(30), 41, SEQ, seed=0)

    full = list(build_data_loader(ds, micro_batch_size=4, consumed_samples=0))
    assert len(full) == 10  # the incomplete last micro-batch is dropped
    assert full[0]["text"].dtype == torch.int64 and full[0]["text"].shape == (4, SEQ + 1)
    assert full[0]["dataset_id"].tolist() == [0, 0, 0, 0]
    served = torch.cat([b["text"] for b in full])
    expected = torch.stack([torch.from_numpy(ds[i]["text"]) for i in range(40)])
    assert torch.equal(served, expected)  # dataset order

    resumed = list(build_data_loader(ds, micro_batch_size=4, consumed_samples=12))
    assert len(resumed) == 7
    for a, b in zip(resumed, full[3:]):
        assert torch.equal(a["text"], b["text"])

    # Two data-parallel ranks with micro batch 2 split each global batch of 4 contiguously.
    ranks = [list(build_data_loader(ds, 2, consumed_samples=12, dp_rank=r, dp_size=2, num_workers=w))
             for r, w in ((0, 0), (1, 1))]
    assert len(ranks[0]) == len(ranks[1]) == 7
    for r0, r1, whole in zip(*ranks, resumed):
        assert torch.equal(torch.cat([r0["text"], r1["text"]]), whole["text"])

    with pytest.raises(ValueError, match="consumed"):
        build_data_loader(ds, 4, consumed_samples=42)


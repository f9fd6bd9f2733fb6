"""Checks a finished work dir by recomputing a random sample of it.

- embeddings: a sample of valid chunks embedded again must match the stored float16 blocks;
- neighbours: a sample of train/valid samples queried again must give the stored neighbours,
  none of which may be invalid or share a document with its sample chunk; the whole neighbour
  files must be sound (query.damaged_neighbors: shape, dtype, size, every id -1 or a valid chunk);
- recall@k of the index against exact search over all embeddings, on those sample chunks.
  A hit counts when its exact score reaches the k-th exact score, so duplicate chunks (equal
  scores, either id right) do not count as misses.
The report is written to WD/verify.json; a failed check raises ValueError after writing it.
"""

import numpy as np

from megatron.retrieval.blocks import log
from megatron.retrieval.embedder import chunk_texts, iter_embedding_blocks
from megatron.retrieval.index import read_embeddings
from megatron.retrieval.query import damaged_neighbors, document_keys
from megatron.retrieval.workdir import WorkDir, write_json

MIN_COSINE = 0.999  # recomputed vs stored embedding (float16 rounding costs ~1e-6)
MIN_NEIGHBOR_AGREEMENT = 0.95  # recomputed vs stored neighbour slots (float noise may swap ties)
# int8 quantises each batch's activations with one scale, so a chunk recomputed in another batch
# gets another embedding: benchmarks/retro_preprocess.py measured min cosine 0.937 and 68.6% of
# filtered neighbours kept on the quickstart's work dir (bf16: 0.99998 and 99.9%, within the
# defaults). These bounds still catch a wrong model or precision (cosine ~0.3-0.9, ~0% kept).
INT8_MIN_COSINE = 0.9
INT8_MIN_NEIGHBOR_AGREEMENT = 0.5
SCORE_TOLERANCE = 1e-4


def exact_top_k(work_dir: str, db, dim: int, block_size: int, queries: np.ndarray, k: int) -> np.ndarray:
    """float32 [Q, k] best inner products over every chunk, streaming the embedding blocks."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for _, vectors in iter_embedding_blocks(work_dir, db, dim, block_size):
        scores = np.concatenate([best, queries @ vectors.T], axis=1)
        best = -np.sort(-scores, axis=1)[:, :k]
    return best


def verify(work_dir: str, db, embedder, gpt_tokenizer, searcher, index, datasets: dict, dim: int,
           block_size: int, num_checks: int, seed: int) -> dict:
    """Run the checks; `datasets` maps split name -> GPT dataset for the splits with neighbours."""
    wd = WorkDir(work_dir)
    rng = np.random.default_rng(seed)
    report = {"failures": []}
    int8 = getattr(embedder, "precision", "fp32") == "int8"
    min_cosine = INT8_MIN_COSINE if int8 else MIN_COSINE
    min_agreement = INT8_MIN_NEIGHBOR_AGREEMENT if int8 else MIN_NEIGHBOR_AGREEMENT

    ids = np.unique(db.random_valid_ids(num_checks, rng))
    stored = read_embeddings(work_dir, db, dim, block_size, ids)
    fresh = embedder.embed(chunk_texts(db.get_chunk_tokens(ids), db.eod, gpt_tokenizer))
    cosine = (stored * fresh).sum(axis=1) / np.linalg.norm(stored, axis=1)
    report["embeddings"] = {"chunks": len(ids), "min_cosine": float(cosine.min()),
                            "max_abs_diff": float(np.abs(stored - fresh).max())}
    if cosine.min() < min_cosine:
        report["failures"].append(f"recomputed embeddings differ from the stored ones "
                                  f"(min cosine {cosine.min():.5f} < {min_cosine})")

    queries_for_recall = []
    for split, dataset in datasets.items():
        path = wd.neighbors(split)
        problem = damaged_neighbors(path, (len(dataset), searcher.chunks_per_sample, searcher.k_save), db)
        if problem:  # its ids cannot be looked up in the chunk DB
            report[split] = {"damaged": problem}
            report["failures"].append(f"{path}: damaged neighbour file, {problem}; rerun --retro-tasks "
                                      f"query-neighbors to rebuild it")
            continue
        stored_all = np.load(path, mmap_mode="r")
        samples = np.sort(rng.choice(len(dataset), size=min(len(dataset),
                                     max(1, num_checks // searcher.chunks_per_sample)), replace=False))
        queries, keys = searcher.embed_samples(dataset, samples)
        fresh_ids = searcher.neighbors(queries, keys)
        stored_ids = np.asarray(stored_all[samples]).reshape(fresh_ids.shape)
        agreement = float((fresh_ids == stored_ids).mean())
        present = stored_ids >= 0
        rows = np.asarray(db.chunks[np.where(present, stored_ids, 0).reshape(-1)])
        neighbor_keys = document_keys(rows[:, 0], rows[:, 1]).reshape(stored_ids.shape)
        same_document = present & (neighbor_keys[:, :, None] == keys[:, None, :]).any(axis=2)
        report[split] = {"samples_checked": len(samples), "chunks_checked": len(queries),
                         "neighbor_agreement": agreement,
                         "same_document_neighbors": int(same_document.sum())}
        if agreement < min_agreement:
            report["failures"].append(f"{split}: recomputed neighbours agree with the stored ones "
                                      f"in only {agreement:.1%} of slots")
        if same_document.any():
            report["failures"].append(f"{split}: {int(same_document.sum())} stored neighbours share "
                                      f"a document with their sample chunk")
        queries_for_recall.append(queries[np.any(queries != 0, axis=1)])

    queries = np.concatenate(queries_for_recall) if queries_for_recall else fresh
    k = min(searcher.k_save, db.num_chunks)
    if len(queries):
        _, found = index.search(np.ascontiguousarray(queries), k)
        kth_best = exact_top_k(work_dir, db, dim, block_size, queries, k)[:, -1:]
        flat = found.reshape(-1)
        order = np.argsort(np.where(flat >= 0, flat, 0), kind="stable")
        vectors = np.empty((len(flat), dim), dtype=np.float32)
        vectors[order] = read_embeddings(work_dir, db, dim, block_size,
                                         np.where(flat >= 0, flat, 0)[order])
        scores = (vectors.reshape(len(queries), k, dim) * queries[:, None, :]).sum(axis=-1)
        hits = (found >= 0) & (scores >= kth_best - SCORE_TOLERANCE)
        report["recall_at_k"] = {"k": k, "queries": len(queries), "recall": float(hits.mean())}
    write_json(wd.verify_report, report)
    log(f"verify: wrote {wd.verify_report}: {report}")
    if report["failures"]:
        raise ValueError(f"{wd.verify_report}: verification failed: " + "; ".join(report["failures"]))
    return report

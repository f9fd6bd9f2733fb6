"""Live retrieval for generation: a just-completed chunk -> its k neighbours from a work dir.

The chunk goes down the same path as the DB's chunks and the training samples' queries
(megatron/retrieval/query.py): GPT tokens, EOD removed, detokenized, embedded with the work dir's
frozen BERT, searched in the work dir's faiss index; candidates that are not valid DB chunks
are dropped and the first k kept, each read with its continuation from the chunk DB (aligned to
the chunk when the model was trained so). Unlike
preprocessing, no document is excluded: a generated text has no document in the DB.

Modes: "on" as above; "random": k valid DB chunks drawn uniformly (the evaluation ablation);
"off" needs no retriever (generation passes none).
"""

import time

import numpy as np

from megatron.retrieval.chunk_db import ChunkDB
from megatron.retrieval.embedder import BertEmbedder, chunk_texts, retriever_info
from megatron.retrieval.index import load_index
from megatron.retrieval.query import NO_DOCUMENT, filter_neighbors
from megatron.retrieval.workdir import check_workdir_matches, load_workdir_config

RETRIEVAL_MODES = ("on", "off", "random")


class LiveRetriever:
    def __init__(self, work_dir: str, tokenizer, num_neighbors: int, mode: str = "on", seed: int = 0,
                 device=None, embed_batch_size: int = 16, align_neighbors: bool = False):
        """align_neighbors: read neighbours aligned to their chunk, as a model trained with
        --retro-align-neighbors saw them (RetroConfig.align_neighbors)."""
        if mode not in ("on", "random"):
            raise ValueError(f"retrieval mode {mode!r}: a retriever serves 'on' or 'random'")
        cfg = load_workdir_config(work_dir)
        check_workdir_matches(cfg, tokenizer_fingerprint=tokenizer.fingerprint())
        self.cfg = cfg
        self.mode = mode
        self.tokenizer = tokenizer
        self.num_neighbors = num_neighbors
        self.align_neighbors = align_neighbors
        self.db = ChunkDB(work_dir, cfg)
        self.chunk_length = self.db.chunk_length
        self.rng = np.random.default_rng(seed)
        self.index = self.embedder = None
        if mode == "on":
            model_dir = cfg["retriever_model"]
            if retriever_info(model_dir)["fingerprint"] != cfg["retriever_fingerprint"]:
                raise ValueError(f"{model_dir}: the retriever model changed since the work dir {work_dir} "
                                 f"was embedded with it (retriever_fingerprint differs)")
            # Queries embedded as the work dir's chunks were (older work dirs: fp32).
            self.embedder = BertEmbedder(model_dir, cfg["bert_max_chunk_length"], embed_batch_size, device,
                                         precision=cfg.get("bert_precision", "fp32"))
            self.index = load_index(work_dir, self.db.num_chunks, cfg["embedding_dim"], cfg["nprobe"],
                                    cfg["ef_search"])
            self.num_candidates = max(num_neighbors, min(cfg["num_neighbors_query"], self.index.ntotal))
        self.seconds = 0.0  # time spent retrieving, for the benchmark's retrieval share

    def retrieve(self, chunks: np.ndarray):
        """chunks: int64 [n, m] token chunks. Returns (ids int64 [n, k] with -1 where fewer
        than k were found, tokens int64 [n, k, 2m] (chunk + continuation), mask bool [n, k])."""
        start = time.perf_counter()
        chunks = np.asarray(chunks, dtype=np.int64).reshape(-1, self.chunk_length)
        n, k = len(chunks), self.num_neighbors
        if self.mode == "random":
            ids = self.db.random_valid_ids(n * k, self.rng).reshape(n, k)
        else:
            queries = self.embedder.embed(chunk_texts(chunks, self.db.eod, self.tokenizer))
            _, candidates = self.index.search(np.ascontiguousarray(queries), self.num_candidates)
            found = candidates >= 0
            valid = np.asarray(self.db.valid[np.where(found, candidates, 0)]) & found
            ids = filter_neighbors(candidates, np.zeros_like(candidates), valid,
                                   np.full((n, 1), NO_DOCUMENT, dtype=np.int64), k)
            ids[~np.any(queries != 0, axis=1)] = -1  # no BERT text: no meaningful query
        mask = ids >= 0
        tokens = self.db.get_tokens(ids, chunks if self.align_neighbors else None)
        self.seconds += time.perf_counter() - start
        return ids, tokens, mask

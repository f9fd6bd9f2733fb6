"""Runs the retro preprocessing tasks over a work dir; the library behind
tools/retro/preprocess_data.py, which documents the arguments.

Tasks, in build order: db-build (chunk DB + embeddings), index-train, index-add,
query-neighbors, verify. "build" runs them all, "index-build" the two index steps. Every task
skips what the work dir already holds, so a rerun resumes where an interrupted one stopped.
"""

import dataclasses
import importlib.metadata
import os

import numpy as np

from megatron.data.blended_dataset import parse_data_path
from megatron.data.builder import build_gpt_datasets, sample_counts
from megatron.data.config import DataConfig
from megatron.data.gpt_dataset import parse_split, split_document_ranges
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.tokenizers import build_tokenizer
from megatron.parallel.ranks import barrier, rank_and_world_size
from megatron.retrieval.blocks import BlockBudget, log
from megatron.retrieval.chunk_db import ChunkDB, build_chunk_db
from megatron.retrieval.embedder import BertEmbedder, chunk_texts, embed_chunk_db, retriever_info
from megatron.retrieval.index import add_to_index, choose_index_str, load_index, read_index_checked, train_index
from megatron.retrieval.query import Searcher, assemble_neighbors, damaged_neighbors, query_split
from megatron.retrieval.verify import verify
from megatron.retrieval.workdir import (CONFIG_NAME, FORMAT_VERSION, BuildRecord, WorkDir, check_build_matches,
                                    check_dataset_fingerprints, dataset_fingerprints, load_workdir_config,
                                    normalize_data_path, remove_leftover_temp_files, write_json)

TASKS = ("db-build", "index-train", "index-add", "query-neighbors", "verify")
TASK_GROUPS = {"build": TASKS, "index-build": ("index-train", "index-add"),
               "query-pretraining-neighbors": ("query-neighbors",)}  # Megatron-LM's name
SPLITS_WITH_NEIGHBORS = ("train", "valid")


def parse_tasks(spec: str) -> list[str]:
    """"build" or a comma-separated list of tasks and groups, in the order given."""
    tasks = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name not in TASKS and name not in TASK_GROUPS:
            raise ValueError(f"--retro-tasks: unknown task {name!r}; expected a comma-separated list "
                             f"of {', '.join(TASKS + tuple(TASK_GROUPS))}")
        tasks += [t for t in TASK_GROUPS.get(name, (name,)) if t not in tasks]
    if not tasks:
        raise ValueError("--retro-tasks: no task given")
    return tasks


def _dataset_entry(prefix: str, document_range: tuple[int, int] | None = None) -> dict:
    if not os.path.isfile(prefix + ".idx"):
        raise ValueError(f"{prefix}.idx: indexed dataset not found")
    indexed = IndexedDataset(prefix)
    entry = {"path": os.path.abspath(prefix), "num_documents": len(indexed),
             "num_tokens": int(indexed.sequence_lengths.sum(dtype=np.int64))}
    if document_range is not None:
        entry["document_range"] = [int(document_range[0]), int(document_range[1])]
    return entry


def _library_versions() -> dict:
    import faiss
    import torch
    import transformers

    return {"retro-megatron": importlib.metadata.version("retro-megatron"), "faiss": faiss.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def describe_build(args, tokenizer) -> dict:
    """The config a work dir built from these arguments records (before any task runs): its
    BuildRecord (megatron/retrieval/workdir.py), as a dict."""
    datasets = [_dataset_entry(prefix) for _, prefix in parse_data_path(args.data_path)]
    if args.retro_db_data_path:
        db_datasets = [_dataset_entry(prefix, (0, len(IndexedDataset(prefix))))
                       for _, prefix in parse_data_path(args.retro_db_data_path)]
    else:
        fractions = parse_split(args.split)
        db_datasets = [dict(entry, document_range=list(split_document_ranges(fractions, entry["num_documents"])[0]))
                       for entry in datasets]
    retriever = retriever_info(args.retro_bert_model)
    if retriever["max_position_embeddings"] and args.retro_bert_max_chunk_length > retriever["max_position_embeddings"]:
        raise ValueError(f"{args.retro_bert_model}: --retro-bert-max-chunk-length "
                         f"{args.retro_bert_max_chunk_length} exceeds the model's "
                         f"{retriever['max_position_embeddings']} positions")
    train, valid, test = sample_counts(args.train_samples, args.train_iters, args.global_batch_size,
                                       args.eval_interval, args.eval_iters)
    return dataclasses.asdict(BuildRecord(
        format_version=FORMAT_VERSION,
        library_version=_library_versions(),
        tokenizer={"type": args.tokenizer_type,
                   **{name: os.path.abspath(path) if path else None for name, path in
                      (("model", args.tokenizer_model), ("vocab_file", args.vocab_file),
                       ("merge_file", args.merge_file))}},
        tokenizer_fingerprint=tokenizer.fingerprint(),
        vocab_size=tokenizer.vocab_size,
        eod=tokenizer.eod,
        chunk_length=args.retro_gpt_chunk_length,
        seq_length=args.seq_length,
        data_path=normalize_data_path(args.data_path),
        split=args.split,
        seed=args.seed,
        datasets=datasets,
        db_data_path=normalize_data_path(args.retro_db_data_path) if args.retro_db_data_path else None,
        db_documents="all documents of --retro-db-data-path" if args.retro_db_data_path
        else "train split of --data-path",
        db_datasets=db_datasets,
        dataset_fingerprints=dataset_fingerprints(dict.fromkeys(d["path"] for d in datasets + db_datasets)),
        retriever_model=os.path.abspath(args.retro_bert_model),
        retriever_fingerprint=retriever["fingerprint"],
        embedding_dim=retriever["embedding_dim"],
        bert_max_chunk_length=args.retro_bert_max_chunk_length,
        bert_precision=args.retro_bert_precision,
        block_size=args.retro_block_size,
        index_str=args.retro_index_str,
        index_ntrain=args.retro_index_ntrain,
        num_neighbors_query=args.retro_query_num_neighbors_query,
        num_neighbors_save=args.retro_query_num_neighbors_save,
        nprobe=args.retro_query_nprobe,
        ef_search=args.retro_query_ef_search,
        train_samples=train,
        valid_samples=valid,
        test_samples=test))


def prepare_workdir(work_dir: str, expected: dict) -> dict:
    """Create the work dir's config, or check the existing one against `expected`."""
    wd = WorkDir(work_dir)
    if not os.path.isfile(wd.config):
        if os.path.isdir(wd.root) and os.listdir(wd.root):
            raise ValueError(f"{wd.root}: not empty and has no {CONFIG_NAME}; it is not a retro work "
                             f"dir, choose another --retro-work-dir")
        write_json(wd.config, expected)
        log(f"created work dir {wd.root}")
        return expected
    cfg = load_workdir_config(work_dir)
    check_build_matches(cfg, expected)
    check_dataset_fingerprints(cfg, expected["dataset_fingerprints"])
    wanted = expected["index_str"]
    recorded = cfg.get("chosen_index_str") or cfg.get("index_str")
    if wanted is not None and recorded is not None and wanted != recorded:
        raise ValueError(f"retro work dir does not match --retro-index-str: index_str is {recorded!r} in "
                         f"the work dir but {wanted!r} here; use a new --retro-work-dir for another index")
    if cfg["library_version"] != expected["library_version"]:
        log(f"note: work dir built with {cfg['library_version']}, running {expected['library_version']}")
    return cfg


def update_config(work_dir: str, **fields) -> dict:
    cfg = load_workdir_config(work_dir)
    cfg.update(fields)
    write_json(WorkDir(work_dir).config, cfg)
    return cfg


class TaskRunner:
    """Holds what the tasks share (tokenizer, retriever, chunk DB) and runs them on this rank."""

    def __init__(self, args):
        self.args = args
        self.wd = WorkDir(args.retro_work_dir)
        self.rank, self.world_size = rank_and_world_size()
        self.budget = BlockBudget(args.retro_stop_after_blocks)
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                         args.merge_file)
        expected = describe_build(args, self.tokenizer)
        if self.rank == 0:
            prepare_workdir(self.wd.root, expected)
            # The other ranks wait at the barrier, so no temporary file is in use.
            if removed := remove_leftover_temp_files(self.wd.root):
                log(f"removed {removed} temporary files left by an interrupted run")
        barrier()
        if self.rank != 0:
            prepare_workdir(self.wd.root, expected)
        self.embedder = BertEmbedder(args.retro_bert_model, args.retro_bert_max_chunk_length,
                                     args.retro_bert_batch_size, precision=args.retro_bert_precision)

    @property
    def cfg(self) -> dict:
        return load_workdir_config(self.wd.root)

    def run(self, tasks: list[str]) -> None:
        for task in tasks:
            log(f"task {task}")
            getattr(self, task.replace("-", "_"))()
            barrier()

    def db_build(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            if cfg.get("num_chunks") is not None and os.path.isfile(self.wd.valid):
                log(f"chunk DB: {cfg['num_chunks']} chunks already built")
            else:
                eod = self.tokenizer.eod
                num_chunks, num_valid = build_chunk_db(
                    self.wd.root, cfg["db_datasets"], cfg["chunk_length"], eod,
                    lambda tokens: chunk_texts(tokens, eod, self.tokenizer), self.embedder.count_tokens)
                update_config(self.wd.root, num_chunks=num_chunks, num_valid_chunks=num_valid)
                log(f"chunk DB: wrote {self.wd.chunks} and {self.wd.valid}: {num_chunks} chunks, "
                    f"{num_chunks - num_valid} invalid (no BERT text)")
        barrier()
        embed_chunk_db(self.wd.root, ChunkDB(self.wd.root), self.embedder, self.tokenizer,
                       cfg["block_size"], self.rank, self.world_size, self.budget)

    def index_train(self) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg
        if cfg.get("chosen_index_str") and os.path.isfile(self.wd.trained_index):
            try:
                read_index_checked(self.wd.trained_index, 0, cfg["embedding_dim"])
                log(f"index: {cfg['chosen_index_str']} already trained")
                return
            except ValueError as e:
                log(f"{e}; training it again")
        db = ChunkDB(self.wd.root)
        index_str = cfg["index_str"]
        if index_str is None:
            index_str = choose_index_str(db.num_chunks)
            log(f"index: no --retro-index-str given; chose {index_str!r} for {db.num_chunks} chunks")
        used = train_index(self.wd.root, db, cfg["embedding_dim"], cfg["block_size"], index_str,
                           cfg["index_ntrain"], cfg["seed"])
        update_config(self.wd.root, chosen_index_str=index_str, index_ntrain_used=used)

    def index_add(self) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg
        db = ChunkDB(self.wd.root)
        if cfg.get("index_ntotal") == db.num_chunks and os.path.isfile(self.wd.index):
            try:
                read_index_checked(self.wd.index, db.num_chunks, cfg["embedding_dim"])
                log(f"index: {self.wd.index} already holds all {db.num_chunks} chunks")
                return
            except ValueError as e:
                log(f"{e}; rebuilding it")
        add_to_index(self.wd.root, db, cfg["embedding_dim"], cfg["block_size"])
        update_config(self.wd.root, index_ntotal=db.num_chunks)

    def _datasets(self, cfg: dict) -> dict:
        """The train/valid GPT datasets exactly as training builds them (None ones left out)."""
        args = self.args
        data = DataConfig(data_path=list(args.data_path), split=args.split,
                          data_cache_path=args.data_cache_path, tokenizer_type=args.tokenizer_type,
                          tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                          merge_file=args.merge_file)
        counts = (cfg["train_samples"], cfg["valid_samples"], cfg["test_samples"])
        built = build_gpt_datasets(data, cfg["seq_length"], counts, cfg["seed"])
        return {split: ds for split, ds in zip(("train", "valid", "test"), built)
                if split in SPLITS_WITH_NEIGHBORS and ds is not None}

    def _searcher(self, cfg: dict, db: ChunkDB):
        index = load_index(self.wd.root, db.num_chunks, cfg["embedding_dim"], cfg["nprobe"], cfg["ef_search"])
        db_ids = {entry["path"]: i for i, entry in enumerate(cfg["db_datasets"])}
        searcher = Searcher(db, index, self.embedder, self.tokenizer, cfg["seq_length"],
                            cfg["num_neighbors_query"], cfg["num_neighbors_save"], db_ids)
        return searcher, index

    def query_neighbors(self) -> None:
        cfg = self.cfg
        db = ChunkDB(self.wd.root)
        datasets = self._datasets(cfg)
        searcher, _ = self._searcher(cfg, db)
        for split in SPLITS_WITH_NEIGHBORS:
            if split not in datasets:
                log(f"{split} neighbours: no {split} samples, nothing to query")
                continue
            path = self.wd.neighbors(split)
            if self.rank == 0 and split in self.cfg.get("neighbor_stats", {}) and os.path.isfile(path):
                shape = (len(datasets[split]), searcher.chunks_per_sample, cfg["num_neighbors_save"])
                if problem := damaged_neighbors(path, shape, db):
                    log(f"{path}: damaged neighbour file, {problem}; rebuilding it")
                    # The config first: killed in between, the next run still rebuilds the split.
                    stats = self.cfg["neighbor_stats"]
                    del stats[split]
                    update_config(self.wd.root, neighbor_stats=stats)
                    os.remove(path)
            barrier()
            if split in self.cfg.get("neighbor_stats", {}) and os.path.isfile(path):
                log(f"{split} neighbours: {path} already written")
                continue
            query_split(self.wd.root, split, datasets[split], searcher, cfg["block_size"],
                        self.rank, self.world_size, self.budget)
            barrier()
            if self.rank == 0:
                stats = assemble_neighbors(self.wd.root, split, len(datasets[split]),
                                           searcher.chunks_per_sample, cfg["num_neighbors_save"],
                                           cfg["block_size"])
                update_config(self.wd.root, neighbor_stats={**self.cfg.get("neighbor_stats", {}),
                                                            split: stats})
            barrier()

    def verify(self) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg
        db = ChunkDB(self.wd.root)
        datasets = {split: ds for split, ds in self._datasets(cfg).items()
                    if os.path.isfile(self.wd.neighbors(split))}
        searcher, index = self._searcher(cfg, db)
        verify(self.wd.root, db, self.embedder, self.tokenizer, searcher, index, datasets,
               cfg["embedding_dim"], cfg["block_size"], self.args.retro_verify_num_chunks, cfg["seed"])


def run_tasks(args) -> dict:
    """Run args.retro_tasks; returns the work dir's final config."""
    tasks = parse_tasks(args.retro_tasks)
    TaskRunner(args).run(tasks)
    return load_workdir_config(args.retro_work_dir)

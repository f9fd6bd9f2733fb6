"""Megatron flags -> config sections."""

import argparse
from dataclasses import fields

import pytest

from megatron.models.retro.config import RetroConfig
from megatron.training.arguments import SECTIONS, parse_args
from megatron.training.config import TrainingConfig
from megatron.training.retro_config import RetroTrainingConfig
from megatron.transformer.config import ModelConfig


def test_flags_land_in_their_sections():
    cfg = parse_args([
        "--num-layers", "3", "--hidden-size", "96", "--num-attention-heads", "6", "--seq-length", "128",
        "--ffn-hidden-size", "200", "--normalization", "LayerNorm", "--no-swiglu",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "50", "--lr", "1e-3",
        "--min-lr", "1e-5", "--lr-decay-style", "linear", "--lr-warmup-iters", "5", "--clip-grad", "0.5",
        "--adam-beta2", "0.99", "--bf16", "--seed", "7", "--eval-interval", "10", "--eval-iters", "3",
        "--log-interval", "2", "--tensorboard-dir", "tb", "--peak-tflops", "312",
        "--wandb-project", "retro", "--wandb-exp-name", "run1", "--wandb-save-dir", "wb",
        "--save", "ck", "--load", "ck", "--save-interval", "10", "--ckpt-keep-last", "2", "--no-load-rng",
        "--data-path", "0.3", "a", "0.7", "b", "--split", "98,2,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", "tok.json", "--num-workers", "1",
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--distributed-backend", "gloo",
    ])
    m, t, d, lg, ck, p = cfg.model, cfg.training, cfg.data, cfg.logging, cfg.checkpoint, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (3, 96, 6, 128)
    assert m.max_position_embeddings == 128  # defaults to --seq-length
    assert (m.ffn_hidden_size, m.normalization, m.swiglu) == (200, "LayerNorm", False)
    assert m.untie_embeddings_and_output_weights and not m.add_bias_linear
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.min_lr) == (2, 16, 50, 1e-3, 1e-5)
    assert (t.lr_decay_style, t.lr_warmup_iters, t.clip_grad, t.adam_beta2, t.bf16, t.seed) == \
        ("linear", 5, 0.5, 0.99, True, 7)
    assert (t.eval_interval, t.eval_iters) == (10, 3)
    assert (lg.log_interval, lg.tensorboard_dir, lg.peak_tflops) == (2, "tb", 312.0)
    assert (lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir) == ("retro", "run1", "wb")
    assert (ck.save, ck.load, ck.save_interval, ck.keep_last_n, ck.no_load_rng, ck.no_load_optim) == \
        ("ck", "ck", 10, 2, True, False)
    assert d.data_path == ["0.3", "a", "0.7", "b"] and d.split == "98,2,0"
    assert (d.tokenizer_type, d.tokenizer_model, d.num_workers) == ("HuggingFaceTokenizer", "tok.json", 1)
    assert (p.tensor_model_parallel_size, p.sequence_parallel, p.distributed_backend) == (2, True, "gloo")


def test_defaults_are_the_dataclass_defaults():
    cfg = parse_args([])
    assert cfg.model == ModelConfig()
    assert cfg.training == TrainingConfig()


def test_megatron_shorthands_translate():
    cfg = parse_args(["--use-distributed-optimizer", "--recompute-activations"])
    assert cfg.parallel.data_parallel_type == "fsdp"
    assert cfg.training.recompute_granularity == "selective"
    assert parse_args(["--recompute-granularity", "full", "--recompute-activations"]).training.recompute_granularity == "full"
    # Megatron's --num-query-groups: 1 by default, and counted only with --group-query-attention.
    assert parse_args(["--group-query-attention"]).model.num_query_groups == 1
    assert parse_args(["--group-query-attention", "--num-query-groups", "2"]).model.num_kv_heads == 2
    assert parse_args(["--num-query-groups", "2"]).model.num_query_groups is None


def test_no_field_name_is_claimed_by_two_sections():
    names = [f.name for cls in SECTIONS.values() for f in fields(cls)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "8"], "not a multiple"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),
    (["--save-interval", "10"], "--save"),
    (["--wandb-project", "retro"], "--wandb-exp-name"),
    (["--num-layers", "0"], "--num-layers"),
    (["--hidden-size", "100", "--num-attention-heads", "3"], "not divisible"),
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups 3"),
    (["--lr-decay-style", "exponential"], "invalid choice"),
])
def test_bad_arguments_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code != 0
    assert message in capsys.readouterr().err + str(e.value.code)


def test_entry_points_add_their_own_group_and_section():
    def add_retro_args(parser: argparse.ArgumentParser):
        group = parser.add_argument_group("retro")
        group.add_argument("--retro-num-neighbors", type=int, default=2)
        group.add_argument("--retro-add-retriever", action="store_true")
        return parser

    cfg = parse_args(["--retro-num-neighbors", "4", "--retro-add-retriever", "--num-layers", "2"],
                     extra_args_provider=add_retro_args,
                     extra_config_provider=lambda args: {"retro": RetroTrainingConfig(
                         add_retriever=args.retro_add_retriever,
                         model=RetroConfig(num_neighbors=args.retro_num_neighbors))})
    assert cfg.retro.add_retriever and cfg.retro.model.num_neighbors == 4
    assert cfg.model.num_layers == 2
    with pytest.raises(SystemExit):
        parse_args(["--retro-num-neighbors", "4"])  # unknown without the provider

"""examples/retro/quickstart.py's flags: the default corpus, the per-corpus file count and --preset."""

import os

from examples.retro import quickstart as qs


def test_the_default_corpus_is_transformers_model_files_and_the_stdlib_an_option():
    args = qs.parse_args([])
    assert (args.input, args.max_files, args.train_iters, args.curve_interval) == ("transformers", 280, 1200, 200)
    import transformers
    assert qs.corpus_dir("transformers") == os.path.join(os.path.dirname(transformers.__file__), "models")
    assert os.path.isdir(qs.corpus_dir("transformers"))
    stdlib = qs.parse_args(["--input", "stdlib"])
    assert stdlib.max_files == 300 and qs.corpus_dir("stdlib") is None  # corpus_from_files's default
    assert qs.corpus_dir("/some/dir") == "/some/dir"
    assert qs.parse_args(["--max-files", "12"]).max_files == 12
    # transformers' models/ holds a directory per model, drawn whole; the stdlib's files one by one.
    assert args.whole_directories and not stdlib.whole_directories
    assert not qs.parse_args(["--no-whole-directories"]).whole_directories


def test_the_long_preset_changes_the_schedule_unless_a_flag_says_otherwise():
    long = qs.parse_args(["--preset", "long"])
    assert (long.train_iters, long.curve_interval, long.global_batch_size, long.max_files) == (1600, 400, 4, 560)
    assert not long.whole_directories and qs.parse_args(["--preset", "long", "--whole-directories"]).whole_directories
    assert long.adaptive and qs.parse_args([]).adaptive
    assert not qs.parse_args(["--preset", "long", "--no-adaptive"]).adaptive
    explicit = qs.parse_args(["--train-iters", "10", "--preset", "long"])
    assert (explicit.train_iters, explicit.curve_interval) == (10, 400)


def test_adaptive_by_default_adds_the_cards_gate_budget_and_retrieval_dropout_to_the_retro_run_only():
    from megatron.training.arguments import build_parser
    from megatron.training.retro_config import add_retro_args

    plain, adaptive = qs.retro_flags(qs.parse_args(["--no-adaptive"])), qs.retro_flags(qs.parse_args([]))
    assert adaptive[:len(plain)] == plain and "--retro-attention-gate" not in plain
    parsed = build_parser(add_retro_args).parse_args(["--retro-work-dir", "unused", *adaptive])
    assert parsed.retro_attention_gate and parsed.retro_budget_loss_coeff == 0.001
    assert parsed.retro_no_retrieval_prob == parsed.retro_random_retrieval_prob == 0.1


def test_the_retro_run_masks_its_neighbours_for_the_first_100_iterations_or_an_eighth_of_a_short_run():
    from megatron.training.arguments import build_parser
    from megatron.training.retro_config import add_retro_args

    parse = build_parser(add_retro_args).parse_args
    for argv, warmup in (([], 100), (["--preset", "long"], 100), (["--train-iters", "12"], 1),
                         (["--retrieval-warmup-iters", "0"], 0)):
        flags = qs.retro_flags(qs.parse_args(argv))
        assert parse(["--retro-work-dir", "unused", *flags]).retro_retrieval_warmup_iters == warmup
    assert parse(["--retro-work-dir", "unused"]).retro_retrieval_warmup_iters == 0  # the library's default


def test_the_corpus_is_named_with_the_version_it_was_drawn_from():
    import transformers
    assert qs.corpus_description(qs.parse_args([])) == \
        f"280 files of transformers {transformers.__version__} models/ source, whole directories drawn with seed 1234"
    import platform
    stdlib = qs.corpus_description(qs.parse_args(["--input", "stdlib", "--max-files", "0"]))
    assert stdlib == f"every file of the Python {platform.python_version()} standard library, files drawn with seed 1234"
    assert qs.corpus_description(qs.parse_args(["--input", "/data/src"])).startswith("300 files of /data/src")

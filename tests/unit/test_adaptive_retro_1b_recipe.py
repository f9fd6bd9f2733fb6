"""The Adaptive-RETRO-GPT-1B recipe (examples/retro/adaptive_retro_1b.sh), rendered with DRY_RUN=1:
it goes from the parquet shards to the evaluation, every flag of every command is one its tool
accepts, and the training command describes a model of the card's size (built on the meta
device: no memory, no data, no tokenizer file)."""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import count_parameters
from megatron.parallel.layout import resolve_batch_sizes
from megatron.parallel.mesh import MeshShape, mesh_shape
from megatron.retrieval.workdir import FORMAT_VERSION, WorkDir
from megatron.training import retro_config, retro_step
from megatron.training.arguments import build_parser, parse_args
from megatron.transformer.config import pad_vocab_size
from tools.preprocess_data import parse_args as parse_preprocess_args
from tools.retro.evaluate import parse_args as parse_evaluate_args
from tools.retro.preprocess_data import parse_args as parse_workdir_args

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "retro" / "adaptive_retro_1b.sh"
SBATCH = REPO / "examples" / "retro" / "adaptive_retro_1b.sbatch"
CARD_PARAMETERS = 1_172_146_179
GPT2_VOCAB = 50257  # the recipe's tokenizer (TOKENIZER_MODEL: GPT-2's tokenizer.json)
TOOLS = ["tools/preprocess_data.py", "tools/preprocess_data.py", "tools/retro/preprocess_data.py",
         "pretrain_retro.py", "tools/retro/evaluate.py"]


def _pretrain_parse(argv):
    return build_parser(retro_config.add_retro_args).parse_args(argv)


PARSERS = {"tools/preprocess_data.py": parse_preprocess_args, "tools/retro/preprocess_data.py": parse_workdir_args,
           "pretrain_retro.py": _pretrain_parse, "tools/retro/evaluate.py": parse_evaluate_args}


def render(script: Path, run_dir: Path, **env) -> list[list[str]]:
    """The script's commands with DRY_RUN=1, each as its argv; the script's own variables are
    dropped from the environment, so its defaults (the card's run) apply."""
    names = set(re.findall(r"\$\{(\w+):-", SCRIPT.read_text())) | {"LAUNCH"}
    base = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run(["bash", str(script)], env={**base, "DRY_RUN": "1", "RUN": str(run_dir), **env},
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [shlex.split(line) for line in out.splitlines()]


def split_launch(cmd: list[str]) -> tuple[str, list[str]]:
    """(tool, its arguments) of `python TOOL ARGS` or `torchrun ... TOOL ARGS`."""
    if cmd[0] == "torchrun":
        launch = get_args_parser().parse_args(cmd[1:])
        assert launch.standalone and launch.nproc_per_node == "8", cmd
        return launch.training_script, launch.training_script_args
    assert cmd[0] == "python", cmd
    return cmd[1], cmd[2:]


def flag(args: list[str], name: str) -> list[str]:
    """The values given after --name (up to the next flag)."""
    i = args.index(name) + 1
    end = next((j for j in range(i, len(args)) if args[j].startswith("--")), len(args))
    return args[i:end]


def option_strings(parse) -> set[str]:
    """Every option a parser defines, as its --help lists them. argparse also takes an unambiguous
    prefix of an option, so parsing alone would let a truncated flag through."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(["--help"])
    # Option lines are indented by two spaces; the options end where two spaces start the help.
    return {name for line in out.getvalue().splitlines() if re.match(r"  -", line)
            for name in re.findall(r"--[\w-]+", line.strip().split("  ")[0])}


@pytest.fixture
def commands(tmp_path) -> list[tuple[str, list[str]]]:
    return [split_launch(cmd) for cmd in render(SCRIPT, tmp_path)]


def test_the_commands_go_from_the_parquet_shards_to_the_evaluation(commands):
    assert [tool for tool, _ in commands] == TOOLS
    (_, fineweb), (_, wikipedia), (_, workdir), (_, train), (_, evaluate) = commands
    assert flag(fineweb, "--input") == ["data/fineweb-edu/sample/10BT/*.parquet"]
    assert flag(wikipedia, "--input") == ["data/wikipedia/20231101.en/*.parquet"]
    assert flag(fineweb, "--json-keys") == flag(wikipedia, "--json-keys") == ["text"]
    # The work dir chunks Wikipedia as the datastore and queries it for FineWeb-Edu's samples.
    training_data = [flag(fineweb, "--output-prefix")[0] + "_text_document"]
    assert flag(workdir, "--retro-db-data-path") == [flag(wikipedia, "--output-prefix")[0] + "_text_document"]
    assert flag(workdir, "--data-path") == flag(train, "--data-path") == training_data
    assert flag(train, "--retro-work-dir") == flag(evaluate, "--retro-work-dir") == flag(workdir, "--retro-work-dir")
    assert flag(evaluate, "--load") == flag(train, "--save")
    # Training refuses a work dir built for other samples or another tokenizer.
    for name in ("--split", "--seq-length", "--seed", "--tokenizer-model", "--train-iters", "--global-batch-size",
                 "--eval-interval", "--eval-iters"):
        assert flag(workdir, name) == flag(train, name), name


def test_every_flag_is_one_its_tool_accepts(commands):
    for tool, args in commands:
        parse = PARSERS[tool]
        parse(args)  # types, choices and the tool's own checks; a misspelt flag exits here
        unknown = {a.split("=")[0] for a in args if a.startswith("--")} - option_strings(parse)
        assert not unknown, f"{tool}: {sorted(unknown)}"


def test_the_training_command_builds_a_model_of_the_cards_size_and_layout(commands, tmp_path):
    _, workdir = commands[2]
    _, train = commands[3]
    # The chunk length comes from the work dir's config.json, which step 3 would write.
    wd = WorkDir(flag(train, "--retro-work-dir")[0])
    os.makedirs(os.path.dirname(wd.config))
    with open(wd.config, "w") as f:
        json.dump({"format_version": FORMAT_VERSION,
                   "chunk_length": int(flag(workdir, "--retro-gpt-chunk-length")[0])}, f)
    # As pretrain_retro.py parses it; the vocabulary padded as build_run_tokenizer pads it.
    cfg = parse_args(train, extra_args_provider=retro_config.add_retro_args,
                     extra_config_provider=retro_config.retro_config_from_args)
    cfg.model.vocab_size = pad_vocab_size(
        GPT2_VOCAB, cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size)
    rc = cfg.retro
    # The card's numbers.
    assert cfg.model.seq_length == 2048 and rc.model.num_neighbors == 2
    assert rc.model.retro_layer_numbers(cfg.model.num_layers) == [5, 11, 17]
    assert rc.model.attention_gate and rc.budget_loss_coeff == 0.001
    assert rc.no_retrieval_prob == rc.random_retrieval_prob == 0.1

    with torch.device("meta"):
        model = retro_step.model_provider(cfg)
    n = count_parameters(model)
    print(f"RetroModel parameters: {n:,} (card: {CARD_PARAMETERS:,}, {(n - CARD_PARAMETERS) / CARD_PARAMETERS:+.2%})")
    assert abs(n - CARD_PARAMETERS) <= 0.01 * CARD_PARAMETERS

    flops, gpt_flops = retro_step.flops_per_token(cfg), gpt_flops_per_token(cfg.model)
    print(f"training FLOPs per token: RETRO {flops / 1e9:.2f} G, GPT of the same decoder {gpt_flops / 1e9:.2f} G")
    assert flops > gpt_flops > 0

    # The layout the script's comments describe: FSDP over all 8 GPUs, 8 micro-batches a step.
    shape = mesh_shape(cfg.parallel, 8)
    assert shape == MeshShape(pp=1, dp_replicate=1, dp_shard=8, tp=1)
    assert resolve_batch_sizes(cfg, shape.dp_replicate * shape.dp_shard) == 8


def test_the_sbatch_runs_the_same_commands_under_srun(tmp_path):
    local = render(SCRIPT, tmp_path)
    slurm = render(SBATCH, tmp_path, SLURM_SUBMIT_DIR=str(REPO))
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "examples/retro/multinode_torchrun.sh"]
    assert len(slurm) == len(local)
    for mine, theirs in zip(local, slurm):
        if mine[0] == "torchrun":
            tool, args = split_launch(mine)
            assert theirs == [*srun, tool, *args]
        else:
            assert theirs == mine

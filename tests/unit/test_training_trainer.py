"""The pretraining loop on a synthetic in-memory dataset: accumulation, resume, exit, logging."""

import json
import struct
import sys

import numpy as np
import pytest
import torch

from megatron.models.gpt.model import GPTModel
from megatron.models.loss import LM_LOSS, lm_loss
from megatron.parallel.layout import Parallelized
from megatron.training.arguments import parse_args
from megatron.training.initialize import _launcher_env, initialize_distributed
from megatron.training.retro_config import RetroTrainingConfig
from megatron.training.trainer import Trainer, data_parallel, evaluate_dataset, pretrain, sample_counts

VOCAB = 64
SEQ = 16


class CountingDataset:
    """Sample i: tokens (7 * i + t) % VOCAB; learnable, and different for every sample."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"text": (7 * i + np.arange(SEQ + 1, dtype=np.int64)) % VOCAB}


def datasets_provider(cfg, counts):
    return CountingDataset(counts[0]), CountingDataset(counts[1]), None


def model_provider(cfg):
    return GPTModel(cfg.model)


def forward_step(model, batch):
    text = batch["text"]
    loss = lm_loss(model(text[:, :-1]), text[:, 1:])
    return loss, {LM_LOSS: loss.detach(), "twice": 2 * loss.detach()}


def _cfg(*extra):
    cfg = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
                      "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
                      "--train-iters", "6", "--lr", "1e-2", "--lr-warmup-iters", "2", "--eval-interval", "3",
                      "--eval-iters", "1", "--log-interval", "1", "--peak-tflops", "1", *extra])
    cfg.model.vocab_size = VOCAB
    return cfg


def _run(*extra):
    return pretrain(_cfg(*extra), model_provider, forward_step, datasets_provider)


def test_megatron_sample_counts():
    cfg = _cfg("--train-iters", "100", "--eval-interval", "30", "--eval-iters", "5", "--global-batch-size", "8")
    assert sample_counts(cfg) == (800, (100 // 30 + 1) * 5 * 8, 5 * 8)


def test_training_logs_megatron_lines_and_learns(capsys):
    summary = _run("--train-iters", "12", "--eval-interval", "6")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(" iteration ")]
    assert len(lines) == 12
    assert "consumed samples:           48 |" in lines[-1] and "global batch size:     4 |" in lines[-1]
    assert "twice: " in lines[-1]
    assert out.count(" validation loss at iteration ") == 2
    history = [m[LM_LOSS] for _, m in summary["train_history"]]
    assert summary["iteration"] == 12 and summary["train_loss"] == history[-1]
    assert history[-1] < history[0] - 0.5
    assert summary["validation_loss"] == summary["validation_history"][-1][1][LM_LOSS]


def _wandb_records(path):
    """The records of an offline run's .wandb file, decoded with wandb's own protobuf (wandb 0.31
    ships no Python reader). The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks (CRC 4 bytes, length 2, type 1: full, first, middle, last); a block's tail of under 7
    bytes is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last: a whole record
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_run_gets_the_logged_scalars(tmp_path, monkeypatch, capsys):
    import wandb

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "default",
                        "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    summary = _run("--train-iters", "4", "--eval-interval", "2", "--save", str(tmp_path / "ckpt"),
                   "--wandb-project", "retro-test", "--wandb-exp-name", "tiny", "--tensorboard-dir", str(tmp_path / "tb"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" iteration ")]
    # run.finish() may return before wandb's service has written the run file out (1 in 10 here);
    # teardown, which a training process's exit runs anyway, waits for it.
    wandb.teardown()

    # Megatron's default place: --save/wandb (wandb adds its own wandb/ folder inside).
    (run_file,) = (tmp_path / "ckpt" / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    history, run = {}, None
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            run = record.run
        elif record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    assert (run.project, run.display_name) == ("retro-test", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"]["train_iters"] == 4 and config["logging"]["wandb_exp_name"] == "tiny"

    assert sorted(history) == [1, 2, 3, 4]  # one row per logged iteration, the iteration as the step
    for iteration, metrics in summary["train_history"]:
        row = history[iteration]
        assert row["lm loss"] == pytest.approx(metrics[LM_LOSS], rel=1e-12)
        assert row["twice"] == pytest.approx(metrics["twice"], rel=1e-12)
        assert row["samples vs steps"] == 4 * iteration
        assert {"learning-rate", "grad-norm", "tokens-per-second", "mfu"} <= row.keys()
    assert f"lm loss: {history[4]['lm loss']:.6E} |" in lines[-1]  # the trainer's own log line
    for iteration, metrics in summary["validation_history"]:
        assert history[iteration]["lm loss validation"] == pytest.approx(metrics[LM_LOSS], rel=1e-12)
        assert "lm loss validation ppl" in history[iteration]
    assert [i for i, _ in summary["validation_history"]] == [2, 4]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard still writes beside it


def test_wandb_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb"):
        _run("--wandb-project", "retro-test", "--wandb-exp-name", "tiny")


def test_gradient_accumulation_matches_one_big_micro_batch():
    accumulated = _run("--micro-batch-size", "1", "--global-batch-size", "4")
    single = _run("--micro-batch-size", "4", "--global-batch-size", "4")
    a = [m[LM_LOSS] for _, m in accumulated["train_history"]]
    b = [m[LM_LOSS] for _, m in single["train_history"]]
    assert a == pytest.approx(b, rel=1e-5)


def test_exit_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, capsys):
    full = _run()
    capsys.readouterr()
    first = _run("--save", str(tmp_path), "--exit-interval", "3")
    assert first["iteration"] == 3 and (tmp_path / "iter_0000003").is_dir()
    saving = f"saving checkpoint at iteration       3 to {tmp_path}\n  successfully saved checkpoint at iteration"
    assert saving in capsys.readouterr().out  # Megatron's two lines around the save
    resumed = _run("--load", str(tmp_path), "--save", str(tmp_path))
    assert resumed["train_history"] == full["train_history"][3:]  # exact floats
    assert resumed["validation_history"] == full["validation_history"][1:]
    assert (tmp_path / "iter_0000006").is_dir()


def test_non_finite_gradients_skip_the_update(capsys):
    def nan_step(model, batch):
        loss, metrics = forward_step(model, batch)
        return loss * float("nan"), metrics

    skipped = pretrain(_cfg("--train-iters", "2", "--eval-iters", "0"), model_provider, nan_step, datasets_provider)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" iteration ")]
    assert "number of skipped iterations:   1" in lines[-1]
    assert skipped["validation_loss"] is None
    frozen = _run("--train-iters", "2", "--eval-iters", "0", "--lr", "0", "--min-lr", "0")
    assert skipped["train_history"] == frozen["train_history"]  # the weights never moved


def test_evaluate_dataset_scores_as_validation_does():
    cfg = _cfg("--eval-iters", "2")
    trainer = Trainer(cfg, model_provider, forward_step, datasets_provider)
    trainer.validate()  # from validation sample 0, as evaluate_dataset starts
    (_, validation), = trainer.validation_history
    dataset = CountingDataset(sample_counts(cfg)[1])
    assert evaluate_dataset(cfg, trainer.env, trainer.par, forward_step, dataset, 2) == validation  # exact floats
    assert trainer.par.model.training

def test_default_parallelism_refuses_what_it_cannot_do():
    env = initialize_distributed(_cfg().parallel, environ={})
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        data_parallel(torch.nn.Linear(2, 2), _cfg("--tensor-model-parallel-size", "2"), env)
    assert data_parallel(torch.nn.Linear(2, 2), _cfg(), env).dp_size == 1


def test_a_pipeline_needs_the_entry_points_loss_fn():
    """Pipeline stages run the model piece by piece, not forward_step: the loss of the last
    stage's logits must come from the entry point."""
    def pipelined(model, cfg, env):
        return Parallelized(model, pipeline=object())

    with pytest.raises(ValueError, match="loss_fn"):
        Trainer(_cfg(), model_provider, forward_step, datasets_provider, parallelize_fn=pipelined)


def test_arguments_block_prints_every_field_of_the_sections_the_run_has(capsys):
    cfg = _cfg()
    Trainer(cfg, model_provider, forward_step, datasets_provider)
    out = capsys.readouterr().out
    assert "  training.micro_batch_size " in out and "  retro." not in out  # a GPT run has no retro section
    cfg.retro = RetroTrainingConfig(budget_loss_coeff=0.5)
    Trainer(cfg, model_provider, forward_step, datasets_provider)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  retro.budget_loss_coeff .") and line.endswith(". 0.5") for line in lines)


def test_launcher_environment_is_read_from_torchrun_or_slurm():
    assert _launcher_env({}) is None
    assert _launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: plain process
    assert _launcher_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == \
        {"RANK": 3, "WORLD_SIZE": 8, "LOCAL_RANK": 1}
    assert _launcher_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}) == \
        {"RANK": 5, "WORLD_SIZE": 16, "LOCAL_RANK": 5}
    env = initialize_distributed(_cfg().parallel, environ={})
    assert (env.rank, env.world_size, env.is_distributed, env.device.type) == (0, 1, False, "cpu")

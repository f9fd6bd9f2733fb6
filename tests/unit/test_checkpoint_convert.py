"""tools/checkpoint/convert.py: a DCP checkpoint becomes one safetensors file that rebuilds the model."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron.models.gpt.model import GPTModel
from megatron.training.checkpointing import TrainState, save_checkpoint
from megatron.training.config import Config, TrainingConfig
from megatron.training.lr_schedule import LRScheduler
from megatron.training.optimizer import build_optimizer
from megatron.transformer.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("untie", [False, True])
def test_export_rebuilds_the_same_model(tmp_path, untie):
    cfg = Config(model=ModelConfig(vocab_size=128, num_layers=2, hidden_size=32, num_attention_heads=4,
                                   seq_length=16, untie_embeddings_and_output_weights=untie),
                 training=TrainingConfig(train_iters=4))
    torch.manual_seed(0)
    model = GPTModel(cfg.model)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.training)
    model(torch.randint(0, 128, (2, 16))).sum().backward()
    optimizer.step()  # so the optimizer state exists and must be left out
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=3), model, optimizer,
                    LRScheduler(optimizer, cfg.training), dataclasses.asdict(cfg))

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--load", str(tmp_path / "ckpt"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["iteration"] == 3 and config["model"]["hidden_size"] == 32
    assert ("output.weight" in weights) == untie  # a tied head is stored once

    rebuilt = GPTModel(ModelConfig(**config["model"]))
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if not untie else set())
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))


def test_no_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--load", str(tmp_path),
                           "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and str(tmp_path) in proc.stderr and "no complete checkpoint" in proc.stderr

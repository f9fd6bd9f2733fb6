"""The LM loss, the FLOP formula against the model's own matmuls, and the peak measurement."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.models.gpt.model import GPTModel
from megatron.training.config import ModelConfig
from megatron.training.flops import gpt_flops_per_token, gpt_matmul_params, measure_matmul_peak_flops
from megatron.training.loss import lm_loss


def test_lm_loss_is_the_mean_token_cross_entropy_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    expected = -torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).mean()
    assert torch.allclose(loss, expected)


def test_lm_loss_mask_averages_only_unmasked_tokens():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 4)
    assert torch.allclose(lm_loss(logits, labels, mask), per_token[mask.bool()].mean())
    assert lm_loss(logits, labels, torch.zeros(2, 4)).item() == 0.0


@pytest.mark.parametrize("swiglu, untie", [(True, False), (False, True)])
def test_matmul_params_are_the_models_linear_weights(swiglu, untie):
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                      swiglu=swiglu, untie_embeddings_and_output_weights=untie)
    model = GPTModel(cfg)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert gpt_matmul_params(cfg) == linears  # includes the head, tied or not; not the lookup
    expected = 6 * linears + 12 * cfg.num_layers * cfg.seq_length * cfg.hidden_size
    assert gpt_flops_per_token(cfg) == expected
    assert gpt_flops_per_token(cfg, seq_length=64) - expected == 12 * 3 * 32 * 64


def test_peak_measurement_is_quick_positive_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    peak = measure_matmul_peak_flops(torch.device("cpu"), seconds=0.2)
    assert torch.equal(torch.get_rng_state(), state)
    assert 1e8 < peak < 1e14 and math.isfinite(peak)

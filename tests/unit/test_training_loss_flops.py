"""The LM loss, the FLOP formula against the model's own matmuls, and the peak MFU is reported against."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.models.gpt.flops import gpt_flops_per_token, gpt_matmul_params
from megatron.models.gpt.model import GPTModel
from megatron.models.loss import lm_loss
from megatron.training import flops
from megatron.training.flops import BestPeak, measure_matmul_peak_flops, mfu_peak, nominal_peak_flops
from megatron.transformer.config import ModelConfig


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


@pytest.mark.parametrize("swiglu, untie, groups", [(True, False, None), (False, True, None), (True, False, 2)])
def test_matmul_params_are_the_models_linear_weights(swiglu, untie, groups):
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                      swiglu=swiglu, untie_embeddings_and_output_weights=untie, num_query_groups=groups)
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


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.5),  # the SXM part's name says no "SXM"
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5),
    ("NVIDIA H100 PCIe", torch.float32, True, 378.0),
    ("NVIDIA H200", torch.float32, False, 67.0),  # fp32 matmuls without TF32 get no tensor cores
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA A10", torch.bfloat16, False, 125.0),  # not A100's figure
    ("NVIDIA L40S", torch.bfloat16, False, 362.05),  # not L40's or L4's
    ("NVIDIA L4", torch.float32, True, 60.0),
    ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7),  # no TF32 units: plain fp32 even if allowed
    ("Tesla V100-PCIE-32GB", torch.float32, False, 14.0),
])
def test_nominal_peak_is_the_datasheets_dense_figure_for_the_dtype(name, dtype, tf32, tflops):
    assert nominal_peak_flops(name, dtype, tf32) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, dtype", [
    ("NVIDIA A10G", torch.bfloat16),  # a different part from the A10, not in the table
    ("NVIDIA GeForce RTX 4090", torch.float32),
    ("Tesla V100-SXM2-16GB", torch.bfloat16),  # no bf16 units
    ("NVIDIA H100 80GB HBM3", torch.float16),  # a dtype the table has no column for
])
def test_nominal_peak_is_none_where_the_table_does_not_know(name, dtype):
    assert nominal_peak_flops(name, dtype) is None


def test_best_peak_keeps_the_highest_measurement_and_a_faster_step_raises_it():
    remeasured = iter([0.8e12, 1.5e12])  # under load, then idle
    peak = BestPeak(1e12, remeasure=lambda: next(remeasured), remeasure_every=2)
    assert peak.mfu(0.5e12) == (0.5, None)
    assert peak.mfu(0.5e12) == (0.5, None)  # re-measured lower: the best seen stays
    mfu, note = peak.mfu(1.2e12)  # a step beat every measurement: it is the new peak
    assert mfu == 1.0 and peak.flops == 1.2e12 and "1.200 TFLOP/s" in note and "step" in note
    mfu, note = peak.mfu(0.6e12)  # re-measured higher
    assert mfu == 0.4 and peak.flops == 1.5e12 and "re-measured" in note
    assert peak.mfu(0.6e12) == (0.4, None)


def test_best_peak_without_remeasuring_still_never_reports_above_one():
    peak = BestPeak(1e12)
    assert [peak.mfu(r)[0] for r in (2e12, 1e12, 3e12)] == [1.0, 0.5, 1.0]


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured although the peak was known")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_peak_tflops_wins_over_table_and_measurement(monkeypatch, device):
    monkeypatch.setattr(flops, "measure_matmul_peak_flops", _no_measuring)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, note = mfu_peak(torch.device(device), torch.bfloat16, peak_tflops=500.0)
    assert peak.mfu(250e12) == (0.5, None) and peak.mfu(600e12)[0] == 1.2  # the user's figure, as given


def test_cuda_peak_is_nominal_for_a_known_gpu_and_measured_for_an_unknown_one(monkeypatch):
    # torch.cuda stays untouched (no GPU here): only the device's name is asked for, and faked.
    monkeypatch.setattr(flops, "measure_matmul_peak_flops", _no_measuring)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    peak, note = mfu_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak.mfu(156e12) == (0.5, None) and "nominal dense" in note and "A100" in note

    monkeypatch.setattr(flops, "measure_matmul_peak_flops", lambda device, dtype, seconds=1.0: 100e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    peak, note = mfu_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak.flops == 100e12 and "measured" in note and "'NVIDIA Future GPU'" in note
    assert peak.mfu(50e12) == (0.5, None)


def test_cpu_peak_is_measured_then_remeasured_in_short_bursts(monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_peak_flops",
                        lambda device, dtype, seconds=1.0: calls.append(seconds) or 1e11 * len(calls))
    peak, note = mfu_peak(torch.device("cpu"), torch.float32)
    assert calls == [1.0] and "measured" in note
    for _ in range(flops.REMEASURE_EVERY):
        peak.mfu(0.5e11)
    assert len(calls) == 2 and calls[1] < 0.1 and peak.flops == 2e11


"""Adaptive retrieval: the budget loss (--retro-budget-loss-coeff) makes retrieval cost something,
so the learned CCA gates close further than without it. (Gate forced closed == GPT path is in
test_retro_model.py; no/random retrieval proportions in test_retro_dataset.py.)"""

import pytest
import torch

from megatron.models.retro.config import RetroConfig
from megatron.training import retro
from megatron.training.config import Config, ModelConfig

V, S, M, K = 64, 16, 4, 2


def batches(steps, b=8, seed=1):
    """Random text; chunk u's first neighbour holds the text that follows it (retrieval helps)."""
    g = torch.Generator().manual_seed(seed)
    l = S // M
    for _ in range(steps):
        text = torch.randint(0, V, (b, S + 1 + 2 * M), generator=g)
        nb = torch.randint(0, V, (b, l, K, 2 * M), generator=g)
        nb[:, :, 0] = text[:, (torch.arange(l)[:, None] + 1) * M + torch.arange(2 * M)]
        yield {"text": text[:, :S + 1], "neighbor_tokens": nb, "neighbor_mask": torch.ones(b, l, K, dtype=torch.bool)}


def train(coeff: float, steps: int = 40):
    """(gate mean of each step, metrics of the last) training a tiny gated RETRO with the real forward_step."""
    cfg = Config(model=ModelConfig(vocab_size=V, num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=S))
    cfg.extra["retro"] = retro.RetroTrainingConfig(
        add_retriever=True, budget_loss_coeff=coeff,
        model=RetroConfig(chunk_length=M, num_neighbors=K, decoder_layers=[1, 2], encoder_num_layers=1,
                          attention_gate=True))
    torch.manual_seed(0)
    model = retro.model_provider(cfg)
    model.init_weights()
    forward_step = retro.make_forward_step(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gates, metrics = [], {}
    for batch in batches(steps):
        loss, metrics = forward_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gates.append(float(metrics[retro.GATE_MEAN]))
    return gates, metrics, model


def test_budget_loss_lowers_the_mean_gate_versus_coefficient_zero():
    free, free_metrics, _ = train(0.0)
    paid, paid_metrics, model = train(1.0)
    assert free[0] == pytest.approx(0.5) and paid[0] == pytest.approx(0.5)  # gates start half open
    assert retro.BUDGET_LOSS not in free_metrics
    assert float(paid_metrics[retro.BUDGET_LOSS]) == pytest.approx(float(paid_metrics[retro.GATE_MEAN]))
    assert paid[-1] < free[-1] - 0.1, (paid[-1], free[-1])
    assert paid[-1] < paid[0] - 0.05
    # The logged gate mean is the mean over retro layers of sigmoid(logit) (of the last forward).
    logits = torch.cat([layer.gate.logit for layer in model.layers.values() if getattr(layer, "gate", None)])
    assert len(logits) == 2


def test_budget_loss_without_a_gate_and_fitting_without_retro_are_refused():
    from megatron.training.arguments import parse_args

    with pytest.raises(SystemExit, match="needs --retro-attention-gate"):
        parse_args(["--retro-work-dir", "unused", "--retro-budget-loss-coeff", "0.5"],
                   extra_args_provider=retro.add_retro_args, extra_config_provider=retro.retro_config_from_args)
    with pytest.raises(SystemExit, match="needs --retro-add-retriever"):
        parse_args(["--retro-work-dir", "unused", "--retro-fit-from", "gpt"],
                   extra_args_provider=retro.add_retro_args, extra_config_provider=retro.retro_config_from_args)

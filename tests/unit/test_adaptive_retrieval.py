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
                          attention_gate=True, cca_gate_init=0.5))
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


# ------------------------------------------------- evaluate.py --overlap-buckets (paper §2.6)


def test_chunk_overlap_is_the_best_neighbours_share_of_the_next_chunks_13_grams():
    import numpy as np

    from tools.retro.evaluate import bucket_of, chunk_overlaps

    m, r = 16, 32
    rng = np.random.default_rng(0)
    text = rng.integers(100, 10_000, 3 * m + 1)
    neighbors = rng.integers(100, 10_000, (3, 2, r))  # chunk u's neighbours: random, nothing shared
    mask = np.ones((3, 2), dtype=bool)
    # Chunk 1 (read through chunk 0's neighbours): neighbour 1 holds its first 10 tokens -> 0 of 4
    # 13-grams; neighbour 0 holds its first 14 tokens -> 2 of 4.
    neighbors[0, 1, 5:15] = text[m:m + 10]
    neighbors[0, 0, 3:17] = text[m:m + 14]
    # Chunk 2: a whole copy in a neighbour that is masked does not count; a real one does, at offset 7.
    neighbors[1, 0, :m] = text[2 * m:3 * m]
    mask[1, 0] = False
    overlaps = chunk_overlaps(text, neighbors, mask, m)
    assert overlaps.tolist() == [0.5, 0.0]
    mask[1, 0] = True
    neighbors[1, 1, 7:7 + m] = text[2 * m:3 * m]
    assert chunk_overlaps(text, neighbors, mask, m).tolist() == [0.5, 1.0]
    # Only whole chunks: a text of 2.5 chunks has one chunk (1) to score.
    assert len(chunk_overlaps(text[:2 * m + 8], neighbors, mask, m)) == 1
    assert [bucket_of(x) for x in (0.0, 0.01, 0.2, 0.21, 0.5, 0.8, 0.81, 1.0)] == \
        ["0", "<=20%", "<=20%", "<=50%", "<=50%", "<=80%", ">80%", ">80%"]
    with pytest.raises(ValueError, match="shorter than the 13-grams"):
        chunk_overlaps(text, neighbors, mask, 8)

"""Adaptive retrieval: the per-chunk gate (--retro-attention-gate) opens on chunks whose neighbours
hold the text and stays low on random ones; the budget loss (--retro-budget-loss-coeff) lowers
it; gate_mean counts only chunks with a real neighbour and is 0 with retrieval off. (A closed
gate equals retrieval off: test_retro_model.py; no/random retrieval proportions:
test_retro_dataset.py.)"""

import pytest
import torch

from megatron.models.retro.config import RetroConfig
from megatron.training import retro_config, retro_step
from megatron.training.config import Config
from megatron.transformer.config import ModelConfig

V, S, M, K = 64, 32, 4, 2
L = S // M


def make_batch(b: int, g: torch.Generator):
    """Random text; each chunk u has, with probability 1/2 ("useful"), the chunk itself and its
    continuation (chunks u, u+1) as first neighbour, as RETRO retrieves; all other neighbours are
    random tokens. Returns (batch, useful [b, l])."""
    text = torch.randint(0, V, (b, S + 1 + 2 * M), generator=g)
    neighbors = torch.randint(0, V, (b, L, K, 2 * M), generator=g)
    useful = torch.rand(b, L, generator=g) < 0.5
    retrieved = text[:, torch.arange(L)[:, None] * M + torch.arange(2 * M)]
    neighbors[:, :, 0] = torch.where(useful[..., None], retrieved, neighbors[:, :, 0])
    batch = {"text": text[:, :S + 1], "neighbor_tokens": neighbors,
             "neighbor_mask": torch.ones(b, L, K, dtype=torch.bool)}
    return batch, useful


def train(coeff: float, steps: int):
    """(gate mean of each step, metrics of the last, model) training a tiny gated RETRO with the
    real forward_step (AdamW, lr 1e-2, batches of 32)."""
    cfg = Config(model=ModelConfig(vocab_size=V, num_layers=2, hidden_size=32, num_attention_heads=2,
                                   seq_length=S, init_method_std=0.1))
    cfg.retro = retro_config.RetroTrainingConfig(
        add_retriever=True, budget_loss_coeff=coeff,
        model=RetroConfig(chunk_length=M, num_neighbors=K, decoder_layers=[2], encoder_num_layers=1,
                          attention_gate=True, cca_gate_init=0.5))
    torch.manual_seed(0)
    model = retro_step.model_provider(cfg)
    model.init_weights()
    forward_step = retro_step.make_forward_step(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    gates, metrics = [], {}
    for _ in range(steps):
        loss, metrics = forward_step(model, make_batch(32, g)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        gates.append(float(metrics[retro_step.GATE_MEAN]))
    return gates, metrics, model.eval()


@pytest.fixture(scope="module")
def trained():
    """~15 s on one thread: copying is learnt by step ~200 (chunk losses below). A budget of 0.05
    at this lr closes every chunk before then (gate ~0.001 on both halves): the card's collapse."""
    return train(0.01, 400)


def test_the_gate_opens_where_the_neighbours_hold_the_text_and_retrieval_pays_there(trained):
    gates, _, model = trained
    assert gates[0] == pytest.approx(RetroConfig.attention_gate_init)  # every chunk starts nearly open
    batch, useful = make_batch(64, torch.Generator().manual_seed(99))
    tokens, labels = batch["text"][:, :-1], batch["text"][:, 1:]
    with torch.no_grad():
        on = model(tokens, batch["neighbor_tokens"], batch["neighbor_mask"])
        values, real = model.chunk_gates()
        off = model(tokens, batch["neighbor_tokens"], torch.zeros_like(batch["neighbor_mask"]))
    assert real.all() and values.shape == (64, L)
    on_useful, on_random = values[useful].mean(), values[~useful].mean()
    assert on_useful > 3 * on_random, (float(on_useful), float(on_random))

    # The positions reading a useful chunk's neighbours, (u+1)m-1 .. (u+2)m-2, predict chunk u+1,
    # which those neighbours hold.
    readers = torch.zeros(64, S, dtype=torch.bool)
    for u in range(L - 1):
        readers[:, (u + 1) * M - 1:(u + 2) * M - 1] = useful[:, u, None]
    loss = lambda logits: torch.nn.functional.cross_entropy(  # noqa: E731
        logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)[readers].mean()
    assert loss(on) < loss(off) - 1.0, (float(loss(on)), float(loss(off)))


def test_budget_loss_lowers_the_mean_gate_versus_coefficient_zero():
    free, free_metrics, _ = train(0.0, 40)
    paid, paid_metrics, _ = train(1.0, 40)
    assert free[0] == pytest.approx(RetroConfig.attention_gate_init) == paid[0]
    assert retro_step.BUDGET_LOSS not in free_metrics
    assert float(paid_metrics[retro_step.BUDGET_LOSS]) == pytest.approx(float(paid_metrics[retro_step.GATE_MEAN]))
    assert paid[-1] < free[-1] - 0.1, (paid[-1], free[-1])
    assert paid[-1] < paid[0] - 0.05


def test_gate_mean_is_over_chunks_with_a_real_neighbour_and_zero_with_retrieval_off(trained):
    _, _, model = trained
    batch, _ = make_batch(4, torch.Generator().manual_seed(3))
    tokens, nb, mask = batch["text"][:, :-1], batch["neighbor_tokens"], batch["neighbor_mask"]
    with torch.no_grad():
        model(tokens, nb, torch.zeros_like(mask))
        assert model.gate_mean().item() == 0.0  # no neighbour reaches the model
        model(tokens, nb, mask)
        values, _ = model.chunk_gates()
        mixed = mask.clone()
        mixed[1:] = False  # samples 1..3 without retrieval, as --retro-no-retrieval-prob makes them
        mixed[0, 2] = False  # and one chunk of sample 0 without neighbours
        model(tokens, nb, mixed)
        kept = [u for u in range(L) if u != 2]
        assert model.gate_mean().item() == pytest.approx(values[0, kept].mean().item())
        assert model.chunk_gates()[0][0, 2] == 0.0 and model.chunk_gates()[0][1:].abs().sum() == 0.0


def test_budget_loss_without_a_gate_and_fitting_without_retro_are_refused():
    from megatron.training.arguments import parse_args

    with pytest.raises(SystemExit, match="needs --retro-attention-gate"):
        parse_args(["--retro-work-dir", "unused", "--retro-budget-loss-coeff", "0.5"],
                   extra_args_provider=retro_config.add_retro_args,
                   extra_config_provider=retro_config.retro_config_from_args)
    with pytest.raises(SystemExit, match="needs --retro-add-retriever"):
        parse_args(["--retro-work-dir", "unused", "--retro-fit-from", "gpt"],
                   extra_args_provider=retro_config.add_retro_args,
                   extra_config_provider=retro_config.retro_config_from_args)


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

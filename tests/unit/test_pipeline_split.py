"""Where the pipeline cuts: FLOP estimates per layer, the balanced split against brute force,
and the Megatron flags that fix the split by hand; a model pruned to its stages runs them."""

import copy
import itertools
import random

import pytest
import torch

from megatron.models.gpt.model import GPTModel
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.parallel.config import ParallelConfig
from megatron.parallel.pipeline import balanced_split, layer_costs, pipeline_layout, prune_to_stages, stage_layers
from megatron.transformer.config import ModelConfig

CFG = dict(vocab_size=128, num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=128)


def brute_force(costs, stages, last_extra):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[-1] += last_extra
        best = max(loads) if best is None else min(best, max(loads))
    return best


def test_encoder_layer_costs_most_then_retro_layers():
    model = RetroModel(ModelConfig(**CFG), RetroConfig(chunk_length=16, num_neighbors=2, decoder_layers=[3, 6]))
    costs = layer_costs(model, 128)
    plain = costs[0]
    assert all(c == plain for i, c in enumerate(costs) if i not in (2, 5))
    assert costs[2] > costs[5] > plain  # layer 3 holds the encoder, layer 6 only CCA
    # The encoder's layer gets a stage of its own when there are stages enough.
    keys = stage_layers(model, balanced_split(costs, 4))
    assert ["2"] in keys


def test_gpt_layers_split_evenly():
    costs = layer_costs(GPTModel(ModelConfig(**CFG)), 128)
    assert balanced_split(costs, 2) == [4, 4] and balanced_split(costs, 4) == [2, 2, 2, 2]


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(1, 10) for _ in range(rng.randint(2, 9))]
    stages = rng.randint(1, len(costs))
    extra = rng.choice([0.0, 5.0])
    split = balanced_split(costs, stages, extra)
    assert len(split) == stages and sum(split) == len(costs) and min(split) >= 1
    bounds = [0]
    for n in split:
        bounds.append(bounds[-1] + n)
    loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[-1] += extra
    assert max(loads) == pytest.approx(brute_force(costs, stages, extra))


def test_first_stage_layers_fixed_by_hand():
    assert balanced_split([1.0] * 8, 3, first_stage_layers=2) == [2, 3, 3]
    with pytest.raises(ValueError, match="--decoder-first-pipeline-num-layers 7"):
        balanced_split([1.0] * 8, 3, first_stage_layers=7)
    with pytest.raises(ValueError, match="at least as many layers"):
        balanced_split([1.0] * 3, 4)


def test_flags_to_layout():
    pp2 = dict(pipeline_model_parallel_size=2)
    assert pipeline_layout(ParallelConfig(**pp2), 8) == ("1F1B", 1, None)
    assert pipeline_layout(ParallelConfig(**pp2, num_layers_per_virtual_pipeline_stage=2), 8) == \
        ("interleaved-1F1B", 2, [2, 2, 2, 2])
    assert pipeline_layout(ParallelConfig(**pp2, pipeline_schedule="gpipe"), 8)[0] == "gpipe"
    with pytest.raises(ValueError, match="not a multiple"):
        pipeline_layout(ParallelConfig(**pp2, num_layers_per_virtual_pipeline_stage=3), 8)
    with pytest.raises(ValueError, match="give one"):
        pipeline_layout(ParallelConfig(**pp2, num_layers_per_virtual_pipeline_stage=2,
                                       decoder_first_pipeline_num_layers=1), 8)


@pytest.mark.parametrize("kind,split", [("gpt", [1, 2, 1]), ("retro", [2, 2]), ("retro", [1, 3]), ("retro", [2, 1, 1])])
def test_model_pruned_to_each_stage_chains_into_the_full_forward(kind, split):
    """Each stage is the model with the other stages' parts removed: fed the previous stage's
    output (RETRO's encoded neighbours by keyword), the last returns the full model's logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(**dict(CFG, num_layers=4, seq_length=32))
    retro = RetroConfig(chunk_length=8, num_neighbors=2, decoder_layers=[2, 3], attention_gate=True)
    model = RetroModel(cfg, retro) if kind == "retro" else GPTModel(cfg)
    model.init_weights()
    tokens = torch.randint(0, CFG["vocab_size"], (2, 32))
    keywords = {}
    if kind == "retro":
        keywords = {"neighbor_tokens": torch.randint(0, CFG["vocab_size"], (2, 4, 2, retro.retrieved_length)),
                    "neighbor_mask": torch.rand(2, 4, 2) > 0.25}
    keys = stage_layers(model, split)
    stages = [prune_to_stages(copy.deepcopy(model), keys, [s]) for s in range(len(split))]
    want = model(tokens, **keywords)
    out = (tokens,)
    for s, stage in enumerate(stages):
        holds_encoder = kind == "retro" and "1" in keys[s]  # layer 2, the first retro layer
        assert (stage.tok_embeddings is None) == (s not in (0, len(split) - 1) and not holds_encoder)
        encoded = {"encoded_neighbors": out[1]} if len(out) == 2 else {}
        out = stage(out[0], token_ids=tokens, **keywords, **encoded)
        out = out if isinstance(out, tuple) else (out,)
    torch.testing.assert_close(out[0], want, rtol=0, atol=0)

import pytest
import torch

from megatron.models.gpt.model import GPTModel, count_parameters
from megatron.transformer.config import ModelConfig


def tiny_config(**overrides):
    kw = dict(vocab_size=97, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24)
    kw.update(overrides)
    return ModelConfig(**kw)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize("swiglu,norm", [(True, "RMSNorm"), (False, "LayerNorm")])
def test_changing_a_token_changes_no_earlier_logit(swiglu, norm):
    model = build(tiny_config(swiglu=swiglu, normalization=norm)).eval()
    tokens = torch.randint(0, 97, (2, 24))
    t = 11
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("swiglu,untie,norm,bias", [
    (True, False, "RMSNorm", False), (False, True, "LayerNorm", True), (True, True, "RMSNorm", True)])
def test_parameter_count_matches_formula(swiglu, untie, norm, bias):
    cfg = tiny_config(swiglu=swiglu, untie_embeddings_and_output_weights=untie,
                      normalization=norm, add_bias_linear=bias)
    h, f, V, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers
    norm_params = 2 * h if norm == "LayerNorm" else h
    attention = 4 * h * h + (4 * h if bias else 0)
    mlp = (3 if swiglu else 2) * h * f + ((2 * f if swiglu else f) + h if bias else 0)
    expected = V * h + L * (2 * norm_params + attention + mlp) + norm_params + (V * h if untie else 0)
    assert count_parameters(build(cfg)) == expected


def test_init_scales_residual_projections():
    cfg = tiny_config(num_layers=8, hidden_size=128, init_method_std=0.02)
    model = build(cfg)
    wo = model.layers["0"].attention.wo.weight.std().item()
    wq = model.layers["0"].attention.wq.weight.std().item()
    assert wq == pytest.approx(0.02, rel=0.1)
    assert wo == pytest.approx(0.02 / 4.0, rel=0.1)


def test_loss_falls_on_a_tiny_corpus():
    cfg = tiny_config()
    model = build(cfg)
    # A repetitive "corpus": the model can learn the cycle.
    data = torch.arange(25).repeat(8)[: 8 * 25] % 97
    batch = torch.stack([data[i:i + 25] for i in range(0, 100, 12)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_sequence_longer_than_positions_is_refused():
    model = build(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max-position-embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_grouped_query_attention_is_mha_with_shared_key_value_heads():
    """Query heads 2g and 2g+1 share key/value head g: MHA whose wk/wv repeat each head twice."""
    gqa = build(tiny_config(num_query_groups=2, add_qkv_bias=True)).eval()
    mha = GPTModel(tiny_config(add_qkv_bias=True)).eval()
    head_dim = gqa.cfg.head_dim
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.split(".")[-2] in ("wk", "wv"):
            heads = tensor.unflatten(0, (-1, head_dim))
            state[name] = heads.repeat_interleave(2, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    assert gqa.layers["0"].attention.wk.weight.shape == (2 * head_dim, 32)
    assert gqa.layers["0"].attention.wq.bias is not None and gqa.layers["0"].attention.wo.bias is None
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-6, atol=1e-6)


def test_query_groups_must_divide_heads_and_tensor_parallel_size():
    from megatron.parallel.tensor_parallel import check_divisible

    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by --num-query-groups 3"):
        GPTModel(tiny_config(num_query_groups=3))
    with pytest.raises(ValueError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        check_divisible(GPTModel(tiny_config(vocab_size=128, num_query_groups=2)), 4, False)

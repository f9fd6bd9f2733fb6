"""Learning-rate schedule shape and AdamW parameter groups."""

import math

import pytest
import torch

from megatron.models.gpt.model import GPTModel
from megatron.training.config import TrainingConfig
from megatron.training.lr_schedule import LRScheduler, lr_at
from megatron.training.optimizer import build_optimizer, param_groups
from megatron.transformer.config import ModelConfig


def _schedule(style, warmup=10, decay=100, max_lr=1.0, min_lr=0.1):
    return [lr_at(i, max_lr, min_lr, warmup, decay, style) for i in range(1, 121)]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_warmup_is_linear_and_reaches_the_peak(style):
    lrs = _schedule(style)
    assert lrs[:10] == pytest.approx([i / 10 for i in range(1, 11)])


def test_cosine_decays_monotonically_to_min_lr_and_stays():
    lrs = _schedule("cosine")
    decay = lrs[9:100]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lrs[99] == pytest.approx(0.1)  # iteration 100 = decay_iters
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: the midpoint
    assert lrs[100:] == [0.1] * 20


def test_linear_decay_is_a_straight_line():
    lrs = _schedule("linear")
    steps = [a - b for a, b in zip(lrs[10:99], lrs[11:100])]
    assert steps == pytest.approx([0.9 / 90] * len(steps))


def test_constant_keeps_the_peak_after_warmup():
    assert _schedule("constant")[10:] == [1.0] * 110


def test_scheduler_sets_the_rate_and_resumes_from_its_state():
    cfg = TrainingConfig(lr=1e-3, min_lr=1e-5, lr_warmup_iters=3, train_iters=20, lr_decay_style="cosine")
    param = torch.nn.Parameter(torch.zeros(2))
    sched = LRScheduler(torch.optim.AdamW([param]), cfg)
    seen = []
    for _ in range(10):
        seen.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 3)
    resumed = LRScheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), cfg)
    resumed.load_state_dict(sched.state_dict())
    for _ in range(10):
        assert resumed.optimizer.param_groups[0]["lr"] == sched.optimizer.param_groups[0]["lr"]
        sched.step()
        resumed.step()


def _tiny_gpt(**kw):
    model = GPTModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                                 vocab_size=64, **kw))
    model.init_weights()
    return model


@pytest.mark.parametrize("untie", [False, True])
def test_param_groups_exempt_norms_and_biases_and_decay_embeddings(untie):
    model = _tiny_gpt(untie_embeddings_and_output_weights=untie, add_bias_linear=True, normalization="LayerNorm")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in decayed
    assert ("output.weight" in decayed) == untie  # a tied head is the embedding: listed once
    assert "layers.0.attention.wq.weight" in decayed
    assert all(n.endswith(".bias") or "norm" in n for n in exempt)
    assert "layers.1.mlp_norm.weight" in exempt and "layers.0.attention.wq.bias" in exempt
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_weight_decay_is_decoupled_and_skips_exempt_parameters():
    model = _tiny_gpt()
    opt = build_optimizer(model, TrainingConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled decay can move a weight
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["layers.0.mlp.w1.weight"], before["layers.0.mlp.w1.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["norm.weight"], before["norm.weight"])
    assert opt.defaults["fused"]  # on CPU too: one pass over each tensor's state
    assert math.isclose(opt.param_groups[0]["betas"][1], 0.95)


def test_the_fused_step_follows_torch_single_tensor_adamw_to_rounding():
    torch.manual_seed(0)
    fused_model = _tiny_gpt()
    reference_model = _tiny_gpt()
    reference_model.load_state_dict(fused_model.state_dict())
    start = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    cfg = TrainingConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(fused_model, cfg)
    reference = torch.optim.AdamW(param_groups(reference_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=False)
    for _ in range(10):
        for a, b in zip(fused_model.parameters(), reference_model.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for (name, a), b in zip(fused_model.named_parameters(), reference_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
        assert (a - start[name]).abs().max() > 1e-2, name  # ten steps of lr 1e-2 moved every weight


def test_a_model_with_every_parameter_frozen_still_gets_an_optimizer():
    model = torch.nn.Linear(4, 4)
    model.requires_grad_(False)
    optimizer = build_optimizer(model, TrainingConfig())
    optimizer.step()  # a pipeline stage with nothing to train steps with the others
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 0

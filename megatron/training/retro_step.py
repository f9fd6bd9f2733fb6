"""The model pretrain_retro.py trains (RETRO, or without --retro-add-retriever the same-size
GPT), its FLOPs per token, and its training step with the metrics it logs: forward_step on the
whole model, the LM loss of its logits (models/loss.py's next_token_loss) plus the gates' budget
(make_budget_loss_fn), the two that pipeline stages run instead."""

import torch

from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel
from megatron.models.loss import next_token_loss
from megatron.models.retro.model import BUDGET_LOSS, GATE_MEAN, RetroModel, retro_flops_per_token
from megatron.training.config import Config

# Below this retrieval-off minus retrieval-on lm loss a model is taken to ignore its neighbours
# (evaluate.py's --min-delta warning, the quickstart's verdict).
MIN_RETRIEVAL_GAIN = 0.01


def model_provider(cfg: Config):
    retro = cfg.retro
    return RetroModel(cfg.model, retro.model) if retro.add_retriever else GPTModel(cfg.model)


def flops_per_token(cfg: Config) -> float:
    retro = cfg.retro
    if retro.add_retriever:
        return retro_flops_per_token(cfg.model, retro.model, cfg.model.seq_length)
    return gpt_flops_per_token(cfg.model)


def make_budget_loss_fn(cfg: Config):
    """budget(gate mean) -> loss, added to the LM loss to price the gates; None when the run has no
    budget (--retro-budget-loss-coeff 0) or no gates. Linear in the gate mean, so that a pipeline
    stage can add its gates' share of it."""
    retro = cfg.retro
    coeff = retro.budget_loss_coeff
    if not (coeff and retro.add_retriever and retro.model.attention_gate):
        return None
    return lambda gate_mean: coeff * gate_mean


def make_forward_step(cfg: Config):
    """forward_step(model, batch) -> (loss, metrics) for a model run whole: ``next_token_loss`` of
    its logits, plus ``make_budget_loss_fn(cfg)`` of its gate mean."""
    retro = cfg.retro
    budget_loss = make_budget_loss_fn(cfg)

    def forward_step(model, batch: dict):
        tokens = batch["text"][:, :-1]
        if not retro.add_retriever:
            return next_token_loss(model(tokens), batch)
        loss, metrics = next_token_loss(model(tokens, batch["neighbor_tokens"], batch["neighbor_mask"]), batch)
        gate = unwrap(model).gate_mean() if retro.model.attention_gate else None
        if gate is not None:
            metrics[GATE_MEAN] = gate.detach()
            if budget_loss is not None:
                budget = budget_loss(gate)
                metrics[BUDGET_LOSS] = budget.detach()
                loss = loss + budget
        return loss, metrics

    return forward_step


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / compile wrappers (FSDP2 and TP keep the module itself)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)

"""The model pretrain_retro.py trains (RETRO, or without --retro-add-retriever the same-size
GPT), its FLOPs per token, and its training step with the metrics it logs."""

import torch

from megatron.models.gpt.flops import gpt_flops_per_token
from megatron.models.gpt.model import GPTModel
from megatron.models.loss import LM_LOSS, lm_loss
from megatron.models.retro.model import BUDGET_LOSS, GATE_MEAN, RetroModel, retro_flops_per_token
from megatron.training.config import Config

# Below this retrieval-off minus retrieval-on lm loss a model is taken to ignore its neighbours
# (evaluate.py's --min-delta warning, the quickstart's verdict).
MIN_RETRIEVAL_GAIN = 0.01


def model_provider(cfg: Config):
    retro = cfg.extra["retro"]
    return RetroModel(cfg.model, retro.model) if retro.add_retriever else GPTModel(cfg.model)


def flops_per_token(cfg: Config) -> float:
    retro = cfg.extra["retro"]
    if retro.add_retriever:
        return retro_flops_per_token(cfg.model, retro.model, cfg.model.seq_length)
    return gpt_flops_per_token(cfg.model)


def make_forward_step(cfg: Config):
    retro = cfg.extra["retro"]
    coeff = retro.budget_loss_coeff

    def forward_step(model, batch: dict):
        text = batch["text"]
        tokens, labels = text[:, :-1], text[:, 1:]
        if not retro.add_retriever:
            loss = lm_loss(model(tokens), labels)
            return loss, {LM_LOSS: loss.detach()}
        logits = model(tokens, batch["neighbor_tokens"], batch["neighbor_mask"])
        loss = lm_loss(logits, labels)
        metrics = {LM_LOSS: loss.detach()}
        gate = unwrap(model).gate_mean() if retro.model.attention_gate else None
        if gate is not None:
            metrics[GATE_MEAN] = gate.detach()
            if coeff:
                budget = coeff * gate
                metrics[BUDGET_LOSS] = budget.detach()
                loss = loss + budget
        return loss, metrics

    return forward_step


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / compile wrappers (FSDP2 and TP keep the module itself)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)

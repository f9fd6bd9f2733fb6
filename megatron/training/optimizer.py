"""AdamW with decoupled weight decay, Megatron's parameter groups.

Megatron decays every weight matrix, embeddings included, and exempts biases and
normalisation weights (the 1-D parameters): decaying a norm's gain towards 0 or a bias towards 0
only fights the data. A tied output head is the embedding's parameter, so it is seen once.
"""

import torch
from torch import nn

from megatron.training.config import TrainingConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, decayed (>= 2-D weights) then not decayed (biases, norm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # A pipeline stage whose parameters are all frozen (RETRO-fitting, a stage without retro
    # layers) still needs an optimizer to step with the others: keep one empty group then.
    return [g for g in groups if g["params"]] or groups[:1]


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel when every parameter is on CUDA, the multi-tensor one otherwise.

    The learning rate set here is replaced by the scheduler before the first step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )

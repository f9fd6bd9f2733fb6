"""Learning rate: linear warmup, then constant / linear / cosine decay to min_lr.

Iterations are counted from 1. Iteration i <= warmup trains with lr * i / warmup (so the first
step already moves the weights); after warmup the rate decays over iterations warmup..decay_iters
and stays at min_lr after that, as in Megatron's OptimizerParamScheduler.
"""

import math

import torch

from megatron.training.config import TrainingConfig


def lr_at(iteration: int, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          decay_style: str) -> float:
    """The learning rate used by (1-based) `iteration`."""
    if warmup_iters > 0 and iteration <= warmup_iters:
        return max_lr * iteration / warmup_iters
    if decay_style == "constant":
        return max_lr
    if iteration >= decay_iters:
        return min_lr
    ratio = (iteration - warmup_iters) / (decay_iters - warmup_iters)
    if decay_style == "linear":
        coeff = 1.0 - ratio
    elif decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"unknown --lr-decay-style {decay_style!r} (expected constant, linear or cosine)")
    return min_lr + coeff * (max_lr - min_lr)


class LRScheduler:
    """Sets the optimizer's rate for the next iteration; its state is the number of steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainingConfig):
        self.optimizer = optimizer
        self.max_lr = cfg.lr
        self.min_lr = cfg.min_lr
        self.warmup_iters = cfg.lr_warmup_iters
        self.decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
        self.decay_style = cfg.lr_decay_style
        self.num_steps = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        return lr_at(iteration, self.max_lr, self.min_lr, self.warmup_iters, self.decay_iters, self.decay_style)

    def current_lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.lr_at(self.num_steps + 1)

    def _apply(self):
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self):
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        # The schedule's shape comes from the command line (a resumed run may change it, as
        # Megatron's --override-opt_param-scheduler does); only the position is state.
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict):
        self.num_steps = int(state["num_steps"])
        self._apply()

"""Gates on a chunked cross-attention output.

TanhGate (every retro layer): Flamingo's tanh(alpha) gate, alpha starting at 0, so a new
RETRO starts as its GPT and retrieval opens only as fast as Adam moves one scalar (about lr per
step). Without it the CCA output, read from the unit-RMS encoder output, is about a third of the
residual stream at init and grows as Adam moves every CCA weight at lr whether or not its
gradient carries signal; that injected neighbour-dependent noise made RETRO train ~0.1 nats
behind its GPT with any neighbours, real or random (docs/experiments.md).

AttentionGate (--retro-attention-gate, adaptive retrieval): a learned sigmoid(logit) on top,
whose mean the budget loss penalises. The value used by the latest forward is kept (with its
autograd graph) so that the trainer can add the budget loss and log it; it is recorded inside
forward because under FSDP the parameter is only whole there.

Both hold one parameter of shape [1] rather than a 0-d scalar: FSDP2 shards along dim 0.
"""

import torch
from torch import nn


class TanhGate(nn.Module):
    def __init__(self, init: float = 0.0):
        super().__init__()
        self.init = init
        self.alpha = nn.Parameter(torch.full((1,), float(init)))

    def reset_parameters(self):
        nn.init.constant_(self.alpha, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(self.alpha).to(x.dtype)


class AttentionGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))
        self.last_value: torch.Tensor | None = None

    def reset_parameters(self):
        nn.init.zeros_(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.sigmoid(self.logit)
        self.last_value = value
        return x * value.to(x.dtype)

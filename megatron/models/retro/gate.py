"""The adaptive-retrieval gate: a learned scalar sigmoid(logit) multiplying one CCA output.

The logit starts at 0, so retrieval starts half open. The value used by the latest forward is
kept (with its autograd graph) so that the trainer can add a budget loss on the mean gate and
log it; it is recorded inside forward because under FSDP the parameter is only whole there.
"""

import torch
from torch import nn


class AttentionGate(nn.Module):
    def __init__(self):
        super().__init__()
        # Shape [1] rather than a 0-d scalar: FSDP2 shards parameters along dim 0.
        self.logit = nn.Parameter(torch.zeros(1))
        self.last_value: torch.Tensor | None = None

    def reset_parameters(self):
        nn.init.zeros_(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.sigmoid(self.logit)
        self.last_value = value
        return x * value.to(x.dtype)

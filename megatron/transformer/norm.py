"""Normalisation layers selected by Megatron's --normalization flag."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def build_norm(normalization: str, dim: int, eps: float) -> nn.Module:
    if normalization == "RMSNorm":
        return RMSNorm(dim, eps)
    if normalization == "LayerNorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown --normalization {normalization!r} (expected RMSNorm or LayerNorm)")

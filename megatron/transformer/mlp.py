"""The feed-forward block: SwiGLU (--swiglu) or GELU."""

import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, swiglu: bool = True, bias: bool = False):
        super().__init__()
        self.swiglu = swiglu
        self.w1 = nn.Linear(dim, ffn_dim, bias=bias)
        # w3 is the SwiGLU gate; GELU has no gate.
        self.w3 = nn.Linear(dim, ffn_dim, bias=bias) if swiglu else None
        self.w2 = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))

"""``--use-torch-compile``: compile each block's forward separately.

Blocks are identical in structure, so one compiled graph serves all of them (compile time does
not grow with depth). Only ``forward`` is compiled, not the module call: the hooks that
activation checkpointing and FSDP2 put around a block stay eager, and parameter names (hence
checkpoint keys) do not change.

A block input that is a view is copied first: on torch 2.13 AOTAutograd mis-routes the gradient
of a compiled-region input that is a view produced by ``DTensor.to_local()`` (the embedding's
output under tensor parallelism), and the backward then fails inside DTensor's redistribute.
Only done under tensor parallelism, where such views arise; for GPT it copies the first
block's input once per step, for RETRO also the (encoded) neighbours entering each retro layer.
"""

import torch
from torch import nn


def _copy_view_inputs(module, args, kwargs):
    def fresh(x):
        return x.clone() if isinstance(x, torch.Tensor) and x._is_view() else x

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


def compile_blocks(model: nn.Module, backend: str = "inductor", copy_view_inputs: bool = False) -> nn.Module:
    for block in model.layers.values():
        if copy_view_inputs:
            block.register_forward_pre_hook(_copy_view_inputs, with_kwargs=True)
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=False)
    return model

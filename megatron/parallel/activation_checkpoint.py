"""Activation checkpointing per block (``--recompute-granularity full|selective``).

- full: a block keeps only its input; its whole forward is recomputed in backward (with TP
  this repeats the block's forward collectives too).
- selective: the block's matmul, attention and collective outputs are saved and only the cheap
  ops between them (norms, RoPE, activations, residual adds, dropout masks are regenerated from
  the saved RNG state) are recomputed. It saves the memory of the elementwise intermediates at
  almost no compute; Megatron's "selective" (recompute the attention core) has no equivalent here
  because scaled_dot_product_attention never materialises the s x s scores it targets.

The composable ``checkpoint`` is used rather than a wrapper module, so parameter names (and
therefore checkpoint keys) are the same with and without recomputation.
"""

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

RECOMPUTE_GRANULARITIES = ("full", "selective")

_aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    # Saving collective results keeps the recomputation free of communication.
    _c10d.all_gather_into_tensor.default,
    _c10d.reduce_scatter_tensor.default,
    _c10d.all_reduce.default,
}


def _save_compute_heavy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, granularity: str) -> nn.Module:
    """Checkpoint every block of ``model.layers`` in place."""
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"unknown --recompute-granularity {granularity!r} (expected full or selective)")
    for block in model.layers.values():
        if granularity == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _save_compute_heavy))
    return model

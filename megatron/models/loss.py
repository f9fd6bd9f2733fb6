"""Language-model loss, kept out of the model so parallel plans can swap how it is computed."""

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

LM_LOSS = "lm loss"  # the metric lm_loss is logged as (Megatron's name), by the trainer and the pipeline


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, [b, s]: logits [b, s, V] (any float dtype, upcast so bf16
    logits do not lose the softmax's precision), labels int64 [b, s]. Vocabulary-sharded DTensor
    logits: as ``lm_loss``, inside ``loss_parallel()``; the losses come back as a plain tensor."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    if isinstance(losses, DTensor):  # per-token losses come back replicated over the TP ranks
        losses = losses.to_local()
    return losses.view(labels.shape)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy in fp32.

    logits [b, s, V] (any float dtype; upcast so bf16 logits do not lose the softmax's precision),
    labels int64 [b, s], loss_mask [b, s] (1 = counts, 0 = ignored) or None for every token.
    Under tensor parallelism the logits may be a DTensor sharded on the vocabulary: call this
    (and the backward) inside ``torch.distributed.tensor.parallel.loss_parallel()``, which
    computes the softmax across the shards without gathering [b, s, V].
    """
    if loss_mask is None and not isinstance(logits, DTensor):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    losses = token_losses(logits, labels).flatten()
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.flatten().to(losses.dtype)
    # clamp: an all-masked micro-batch contributes 0 instead of NaN
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def next_token_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """loss_fn of language-model batches ({"text": tokens [b, s + 1]}): the LM loss of the logits
    of text[:, :-1] on the next tokens."""
    loss = lm_loss(logits, batch["text"][:, 1:])
    return loss, {LM_LOSS: loss.detach()}

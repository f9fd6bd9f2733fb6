"""Copy probe: does a checkpoint copy text, from its own context and from its neighbours?

At small scale RETRO's gain on held-out text comes from reusing what a neighbour contains: find
where the current text sits in the neighbour and emit what follows it (paper §2.6, Fig. 6). That
is the cross-attention form of an induction head, and a language model learns it in its own
context too. The probe feeds uniformly random tokens, which nothing predicts but copying (lm loss
about ln V otherwise):

- in_context: a random string of half a sequence, then the same string again (neighbours off);
  lm loss on predicting the first copy and the repeat. A model that copies from its context
  scores the repeat far below ln V.
- from_neighbors: random text; for each chunk u, neighbour 0 holds r tokens of the sample's own
  text starting `offset` tokens after the start of chunk u (offset 0: chunk u and its
  continuation, as retrieval finds a duplicate that starts where the chunk starts; other
  offsets: the same text displaced, as real retrieval finds it), the other neighbours masked.
  lm loss on chunks 1.. (the chunks that read neighbours) with retrieval on and off.
"""

import math

import torch

from megatron.models.loss import token_losses

DEFAULT_OFFSETS = (0, 23)


def _lm_loss(model, text: torch.Tensor, neighbors=None, mask=None) -> torch.Tensor:
    tokens, labels = text[:, :-1], text[:, 1:]
    logits = model(tokens) if neighbors is None else model(tokens, neighbors, mask)
    return token_losses(logits, labels)


@torch.no_grad()
def copy_probe(model, vocab_size: int, seq_length: int, chunk_length: int | None = None,
               num_neighbors: int | None = None, batch_size: int = 16, offsets=DEFAULT_OFFSETS,
               seed: int = 0, device="cpu") -> dict:
    """The probe's lm losses (module docstring). chunk_length / num_neighbors: the RETRO model's
    m and k; None for a GPT, which gets the in-context part only. Offsets must lie in 0..m so that
    the neighbour covers the whole next chunk."""
    g = torch.Generator().manual_seed(seed)
    s, half = seq_length, seq_length // 2
    if half < 2:
        raise ValueError(f"copy probe: seq length {s} is too short to repeat a string")
    retro = chunk_length is not None
    string = torch.randint(0, vocab_size, (batch_size, half), generator=g)
    repeated = torch.cat([string, string, string[:, : s + 1 - 2 * half]], dim=1).to(device)
    out = {"ln_vocab": math.log(vocab_size)}
    if retro:
        m, k = chunk_length, num_neighbors
        l = -(-s // m)
        no_neighbors = torch.zeros(batch_size, l, k, 2 * m, dtype=torch.long, device=device)
        off = torch.zeros(batch_size, l, k, dtype=torch.bool, device=device)
        loss = _lm_loss(model, repeated, no_neighbors, off)
    else:
        loss = _lm_loss(model, repeated)
    # Position i predicts token i + 1: the first copy is predicted by 0 .. half - 2, the repeat
    # (all but its first token, which follows nothing copyable) by half .. 2 * half - 2.
    out["in_context"] = {"first": float(loss[:, : half - 1].mean()),
                         "repeat": float(loss[:, half: 2 * half - 1].mean())}
    if not retro:
        return out

    if any(not 0 <= o <= m for o in offsets):
        raise ValueError(f"copy probe: offsets {offsets} must lie in 0..{m} (the chunk length)")
    r = 2 * m
    text = torch.randint(0, vocab_size, (batch_size, l * m + max(offsets) + r), generator=g)
    sample = text[:, : s + 1].to(device)
    on = off.clone()
    on[:, :, 0] = True
    # Positions m - 1 .. s - 1 read neighbours (chunked cross-attention is shifted by m - 1). With
    # every neighbour masked the offset changes nothing: one retrieval-off loss serves them all.
    loss_off = float(_lm_loss(model, sample, no_neighbors, off)[:, m - 1:].mean())
    out["from_neighbors"] = {}
    for offset in offsets:
        neighbors = torch.zeros(batch_size, l, k, r, dtype=torch.long)
        starts = torch.arange(l) * m + offset
        neighbors[:, :, 0] = text[:, starts[:, None] + torch.arange(r)]
        loss_on = float(_lm_loss(model, sample, neighbors.to(device), on)[:, m - 1:].mean())
        out["from_neighbors"][str(offset)] = {"on": loss_on, "off": loss_off}
    return out

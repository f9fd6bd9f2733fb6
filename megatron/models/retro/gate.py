"""Gates on a chunked cross-attention output.

TanhGate (every retro layer): Flamingo's tanh(alpha) gate on the CCA output, alpha starting at
RetroConfig.cca_gate_init (0.1). Without a gate the CCA output, read from the unit-RMS encoder
output, is about a third of the residual stream at init and grows as Adam moves every CCA weight
at lr whether or not its gradient carries signal; that injected neighbour-dependent noise made
RETRO train ~0.1 nats behind its GPT with any neighbours, real or random. Flamingo's start at 0
removes the noise but also the CCA's gradient: alpha then random-walks around 0, flipping the
sign of every CCA gradient, and the gate stayed shut even over neighbours that held the text.
A tenth of the output disturbs the decoder little and lets the CCA learn (docs/experiments.md).

AttentionGate (--retro-attention-gate, adaptive retrieval): a value in [0, 1] per chunk u,
sigmoid(scale * ((1 - o_u) * logit_none + o_u * logit_full)), multiplying the CCA output of the
positions that read chunk u's neighbours; the budget loss penalises its mean. o_u
(`neighbor_overlap`) is the share of chunk u's token bigrams found in its best real neighbour:
evidence that the neighbours hold this text and so, likely, what follows it (RETRO's gain sits in such chunks,
paper §2.6). Bigrams, since two chunks of one language share frequent tokens by chance. Causal:
chunk u's tokens and neighbours are all known at its last token, the first position reading them.

Why not the decoder states and encoded neighbours (a linear on their chunk means, a bilinear or
cosine similarity of them): on the corpus of tests/unit/test_adaptive_retrieval.py such gates
gave useful and random neighbours the same value, as after a few hundred steps neither
representation keeps the token identity that tells them apart, and their many weights let the
budget loss close every chunk before retrieval paid (the Adaptive-RETRO card's collapse). Two
scalars move the logit at a rate the scale below sets, and the overlap separates the chunks
from step 0.
Two end logits rather than a bias and a slope: chunks the neighbours do not hold move only
logit_none, chunks they hold only logit_full, so opening the useful ones does not open the
others too (a shared bias separated that corpus's two halves about half as well).

Per chunk, not per token: the neighbours, and so the evidence, come once per chunk, before any
position reads them (incremental decoding computes the gate once per chunk), and the mean over
chunks is the share of retrieved chunks let in, which is what the budget should price.

Each end logit is RetroConfig.attention_gate_logit_scale (30) times its parameter. Adam moves a
parameter by about lr per step whatever its gradient's size, so a logit read as the bare
parameter moved less than 1 in an 800-step run at lr 1e-3: the gate stayed near its start
everywhere, over random neighbours too (docs/experiments.md). The scale lets it cross the
sigmoid's range within such a run.

Both logits start where the gate is RetroConfig.attention_gate_init (0.9): every chunk starts
nearly open. A start of 0.5 halved every CCA output and, as a smaller tanh gate does, slowed the
CCA's learning: the model then read its neighbours into a higher loss (docs/experiments.md).

A chunk without a real neighbour gets exactly 0 (its CCA output is 0 anyway). The latest
forward's values are kept, with their autograd graph, for the budget loss and the logs: `last_value` [b, w] for the w whole chunks
(a partial last chunk's neighbours are read by no position) and `last_real` [b, w], the chunks
with a real neighbour, over which the mean is taken. They are recorded inside forward because
under FSDP the parameters are only whole there.

Every parameter has shape [1] rather than a 0-d scalar: FSDP2 shards along dim 0.
"""

import math

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


def neighbor_overlap(tokens: torch.Tensor, neighbor_tokens: torch.Tensor,
                     neighbor_mask: torch.Tensor | None, chunk_length: int) -> torch.Tensor:
    """tokens [b, s]; neighbor_tokens [b, l, k, r]; neighbor_mask bool [b, l, k] or None (all real).
    Returns [b, w, k] for the w = s // m whole chunks: the share of chunk u's m - 1 bigrams that
    occur in neighbour k, 0 for a masked neighbour."""
    b, s = tokens.shape
    m = chunk_length
    w = s // m
    chunks = tokens[:, :w * m].reshape(b, w, 1, m, 1)
    neighbors = neighbor_tokens[:, :w, :, None, :]
    same = chunks == neighbors  # [b, w, k, m, r]: chunk token i equals neighbour token j
    found = (same[..., :-1, :-1] & same[..., 1:, 1:]).any(dim=-1).float().mean(dim=-1)
    return found if neighbor_mask is None else found * neighbor_mask[:, :w]


class AttentionGate(nn.Module):
    def __init__(self, chunk_length: int, logit_scale: float, init: float):
        super().__init__()
        if chunk_length < 2:
            raise ValueError("--retro-attention-gate compares bigrams: it needs chunks of at least 2 tokens")
        if not 0 < init < 1:
            raise ValueError(f"--retro-attention-gate-init must lie in (0, 1), got {init}")
        self.chunk_length = chunk_length
        self.logit_scale = logit_scale
        self.init = init
        self.logit_none = nn.Parameter(torch.empty(1))  # the logit at overlap 0
        self.logit_full = nn.Parameter(torch.empty(1))  # and at overlap 1
        self.reset_parameters()
        self.last_value: torch.Tensor | None = None
        self.last_real: torch.Tensor | None = None

    def reset_parameters(self):
        start = math.log(self.init / (1 - self.init)) / self.logit_scale  # no tensor: meta-device safe
        nn.init.constant_(self.logit_none, start)
        nn.init.constant_(self.logit_full, start)

    def chunk_values(self, overlap: torch.Tensor, neighbor_mask: torch.Tensor) -> torch.Tensor:
        """overlap [..., k] (neighbor_overlap), neighbor_mask bool [..., k] -> the gate [...]."""
        best = overlap.amax(dim=-1)
        value = torch.sigmoid(self.logit_scale * ((1 - best) * self.logit_none + best * self.logit_full))
        return value * neighbor_mask.any(dim=-1).to(value.dtype)

    def forward(self, x: torch.Tensor, overlap: torch.Tensor, neighbor_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [b, s, d] a CCA output; overlap: [b, w, k] of its neighbours; neighbor_mask: bool
        [b, l, k] or None (all real)."""
        b, s, _ = x.shape
        m, w = self.chunk_length, overlap.shape[1]
        real = torch.ones_like(overlap, dtype=torch.bool) if neighbor_mask is None else neighbor_mask[:, :w]
        values = self.chunk_values(overlap, real)
        self.last_value, self.last_real = values, real.any(dim=-1)
        # Positions (u+1)m-1 .. (u+2)m-2 read chunk u's neighbours; the first m - 1 read none.
        per_position = torch.cat((values.new_zeros(b, m - 1), values[:, :, None].expand(b, w, m).reshape(b, w * m)),
                                 dim=1)[:, :s]
        return x * per_position[..., None].to(x.dtype)

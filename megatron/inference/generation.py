"""Text generation with a KV cache and, for RETRO, live retrieval at every chunk boundary.

    out = generate(model, prompt_tokens, max_new_tokens, retriever=LiveRetriever(...),
                   sampling=SamplingConfig(temperature=0.8, top_p=0.9))

The prompt is fed in one step (its completed chunks retrieved first, together); then each new
token costs one cached step. When a token completes chunk u, chunk u is sent to the retriever
before that token is fed, so its neighbours are encoded (conditioned on chunk u's decoder
states) in the same step and the tokens from there to the end of chunk u+1 attend to them, as
in training. Without a retriever (retrieval off, or a GPT) no chunk gets neighbours.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron.inference.decoder import IncrementalDecoder


@dataclass
class SamplingConfig:
    greedy: bool = False  # argmax (also when temperature is 0)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_k}, {self.top_p}")


def sample_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if sampling.greedy or sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the ones before it already hold top_p of the mass (the first stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class ChunkRetrieval:
    """What was retrieved for one chunk of the text (prompt or generated)."""
    chunk: int  # chunk index u: tokens u*m .. (u+1)*m - 1
    chunk_tokens: np.ndarray  # [m]
    neighbor_ids: np.ndarray  # [k], -1 = none
    neighbor_tokens: np.ndarray  # [k, r]
    neighbor_mask: np.ndarray  # [k]


@dataclass
class GenerationOutput:
    tokens: list[int]  # prompt + generated
    num_prompt_tokens: int
    retrievals: list[ChunkRetrieval] = field(default_factory=list)
    seconds: float = 0.0  # the whole generation, retrieval included
    retrieval_seconds: float = 0.0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@torch.no_grad()
def generate(model, prompt_tokens, max_new_tokens: int, retriever=None, sampling: SamplingConfig | None = None,
             eod: int | None = None, vocab_size: int | None = None, generator: torch.Generator | None = None,
             device=None) -> GenerationOutput:
    """Generate up to max_new_tokens after prompt_tokens (stopping early at `eod` if given, or at
    the model's last position). vocab_size: the tokenizer's, so the padded ids are never sampled.
    retriever: a LiveRetriever, or None for no retrieval."""
    sampling = sampling or SamplingConfig()
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.rope_cos.shape[0]
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model has {limit} positions")
    device = device or model.tok_embeddings.weight.device
    total = min(limit, len(prompt) + max_new_tokens)
    decoder = IncrementalDecoder(model, max_length=total)
    chunk_length = decoder.chunk_length if retriever is not None else None
    if chunk_length is not None and retriever.chunk_length != chunk_length:
        raise ValueError(f"the work dir's chunk length {retriever.chunk_length} differs from the model's {chunk_length}")
    out = GenerationOutput(tokens=list(prompt), num_prompt_tokens=len(prompt))
    retrieval_start = retriever.seconds if retriever is not None else 0.0
    start = time.perf_counter()

    def neighbors_for(first: int, end: int) -> dict:
        """Retrieve for the chunks completed by feeding positions first .. end - 1."""
        chunks = list(decoder.chunks_completed_by(first, end)) if chunk_length else []
        if not chunks:
            return {}
        m = chunk_length
        chunk_tokens = np.array([out.tokens[u * m:(u + 1) * m] for u in chunks], dtype=np.int64)
        ids, tokens, mask = retriever.retrieve(chunk_tokens)
        result = {}
        for i, u in enumerate(chunks):
            out.retrievals.append(ChunkRetrieval(u, chunk_tokens[i], ids[i], tokens[i], mask[i]))
            result[u] = (torch.from_numpy(tokens[i][None]).to(device), torch.from_numpy(mask[i][None]).to(device))
        return result

    logits = decoder.step(torch.tensor([prompt], device=device), neighbors_for(0, len(prompt)))[0, -1]
    while len(out.tokens) < total:
        if vocab_size is not None:
            logits[vocab_size:] = float("-inf")
        token = sample_token(logits, sampling, generator)
        out.tokens.append(token)
        if token == eod or len(out.tokens) == total:
            break
        position = len(out.tokens) - 1
        logits = decoder.step(torch.tensor([[token]], device=device),
                              neighbors_for(position, position + 1))[0, -1]
    out.seconds = time.perf_counter() - start
    out.retrieval_seconds = retriever.seconds - retrieval_start if retriever is not None else 0.0
    return out

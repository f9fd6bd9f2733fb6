"""How much of a chunk its neighbours already contain: RETRO's 13-gram overlap (paper §2.6).

Shared by tools/retro/evaluate.py (--overlap-buckets: loss per overlap bucket) and
tools/retro/inspect_workdir.py (a sample's overlaps and the split's histogram), so that both count
the same thing. A chunk C_v is predicted by the positions that read the neighbours of C_{v-1}
(chunked cross-attention is shifted by one chunk), so C_v is compared with those neighbours,
each as the 2m tokens the model reads (chunk + continuation).
"""

import numpy as np

OVERLAP_NGRAM = 13
# (name, upper bound) in order; a chunk goes to the first bucket whose bound it does not exceed.
OVERLAP_BUCKETS = (("0", 0.0), ("<=20%", 0.2), ("<=50%", 0.5), ("<=80%", 0.8), (">80%", 1.0))


def ngrams(tokens: np.ndarray, n: int) -> set[bytes]:
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if len(tokens) < n:
        return set()
    return {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(tokens, n)}


def neighbor_overlaps(chunk: np.ndarray, neighbors, n: int = OVERLAP_NGRAM) -> list[float]:
    """For each neighbour (tokens [r]), the fraction of the chunk's distinct n-grams found in it."""
    if len(chunk) < n:
        raise ValueError(f"a chunk of {len(chunk)} tokens is shorter than the {n}-grams compared")
    grams = list(ngrams(chunk, n))
    overlaps = []
    for tokens in neighbors:
        found = ngrams(tokens, n)
        overlaps.append(sum(g in found for g in grams) / len(grams))
    return overlaps


def chunk_overlaps(text: np.ndarray, neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray, chunk_length: int,
                   n: int = OVERLAP_NGRAM) -> np.ndarray:
    """Overlap of chunks 1 .. of one sample (text [>= s + 1]; neighbours [l, k, r], mask [l, k]):
    entry v - 1 = the largest fraction of chunk v's n-grams found in one neighbour of chunk v - 1.
    Only whole chunks inside the first s + 1 tokens count."""
    m = chunk_length
    if m < n:
        raise ValueError(f"chunk length {m} is shorter than the {n}-grams compared")
    num_chunks = min(len(neighbor_tokens), len(text) // m)
    out = np.zeros(max(0, num_chunks - 1))
    for v in range(1, num_chunks):
        real = neighbor_tokens[v - 1][np.asarray(neighbor_mask[v - 1], dtype=bool)]
        out[v - 1] = max(neighbor_overlaps(text[v * m:(v + 1) * m], real, n), default=0.0)
    return out


def bucket_of(overlap: float) -> str:
    return next(name for name, bound in OVERLAP_BUCKETS if overlap <= bound)

"""Aligned neighbours: read each neighbour from where the retrieving chunk sits in it.

RETRO reads a neighbour as the DB chunk and its continuation, cut at the DB's chunk boundaries.
A near-duplicate of the retrieving chunk C_u then holds C_u's text at an arbitrary offset, and
to copy what follows the model must find that offset by content, an induction-like circuit that
does not form in a CPU-sized run (docs/experiments.md: with neighbours holding the text 0-48
tokens displaced, the default model gained nothing in 400 steps; aligned, it gained 0.155 nats).

Aligning moves the 2m-token window read from the neighbour's document by the shift at which the
most n-grams of C_u match it, |shift| <= m, so that the window's first half lines up token by
token with C_u and its second half, the continuation, with the chunk the model predicts. Causal:
the shift depends on C_u (known when its neighbours are first read) and on DB text only.
"""

import numpy as np

ALIGN_NGRAM = 4
_HASH_BASE = np.uint64(1_000_003)


def _ngram_hashes(tokens: np.ndarray, n: int, eod: int, pad: int) -> np.ndarray:
    """int64 [rows, width - n + 1] hashes of the n-grams of tokens [rows, width]; grams that
    hold an EOD get the value `pad`, which a caller chooses to match nothing."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), n, axis=1)
    hashes = np.zeros(windows.shape[:2], dtype=np.uint64)
    for i in range(n):
        hashes = hashes * _HASH_BASE + windows[..., i]
    hashes = hashes.view(np.int64)
    return np.where((windows == np.uint64(eod)).any(axis=-1), pad, hashes)


def alignment_shifts(queries: np.ndarray, windows: np.ndarray, chunk_length: int, eod: int,
                     n: int = ALIGN_NGRAM) -> np.ndarray:
    """int64 [rows]: for each query chunk [m] and the 4m tokens around its neighbour (m before the
    neighbour chunk, the chunk, 2m after), the shift s in -m..m such that window[m + s + i]
    matches query[i] for the most n-grams; 0 where none matches (ties: the smallest |s|)."""
    m = chunk_length
    rows = len(queries)
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    q = _ngram_hashes(queries, n, eod, pad=-1)
    w = _ngram_hashes(windows, n, eod, pad=-2)
    hits = q[:, :, None] == w[:, None, :]  # [rows, i, j]
    row, i, j = np.nonzero(hits)
    shift = j - i - m
    keep = np.abs(shift) <= m
    votes = np.bincount(row[keep] * (2 * m + 1) + shift[keep] + m, minlength=rows * (2 * m + 1))
    votes = votes.reshape(rows, 2 * m + 1).astype(np.float64)
    # Prefer small shifts on ties; no vote at all leaves the neighbour where RETRO reads it.
    votes -= np.abs(np.arange(-m, m + 1)) / (4.0 * m)
    best = votes.argmax(axis=1) - m
    return np.where(votes.max(axis=1) >= 1.0 - 0.25, best, 0).astype(np.int64)

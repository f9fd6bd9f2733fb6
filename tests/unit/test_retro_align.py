"""Aligned neighbours (megatron/retrieval/align.py): the shift that lines a neighbour up with its chunk."""

import numpy as np

from megatron.retrieval.align import alignment_shifts

M, EOD = 16, 0


def window_and_query(shift, seed=0):
    rng = np.random.default_rng(seed)
    window = rng.integers(1, 500, size=4 * M)
    return window, window[M + shift:2 * M + shift].copy()


def test_the_shift_that_lines_the_query_up_is_found_at_every_offset():
    shifts = range(-M, M + 1)
    pairs = [window_and_query(s, seed) for seed, s in enumerate(shifts)]
    windows = np.stack([w for w, _ in pairs])
    queries = np.stack([q for _, q in pairs])
    assert list(alignment_shifts(queries, windows, M, EOD)) == list(shifts)


def test_most_matching_ngrams_win_over_a_stray_match():
    window, query = window_and_query(5)
    window[M - 7:M - 3] = query[:4]  # one 4-gram of the query also sits at shift -7
    query[-3:] = 999  # and the true copy is imperfect at its end
    assert alignment_shifts(query[None], window[None], M, EOD)[0] == 5


def test_no_shared_ngram_or_only_padding_leaves_the_neighbour_in_place():
    rng = np.random.default_rng(1)
    window = rng.integers(1, 500, size=4 * M)
    unrelated = rng.integers(500, 1000, size=M)
    padding = np.full(M, EOD)
    padded_window = window.copy()
    padded_window[:2 * M] = EOD
    shifts = alignment_shifts(np.stack([unrelated, padding]), np.stack([window, padded_window]), M, EOD)
    assert list(shifts) == [0, 0]


def test_a_copy_with_a_few_edits_still_aligns():
    window, query = window_and_query(-9, seed=4)
    query[[3, 8, 12]] = 999  # three tokens renamed: most 4-grams still match at -9
    assert alignment_shifts(query[None], window[None], M, EOD)[0] == -9

"""RetroDataset logic over a stand-in chunk DB whose chunk c holds tokens [c, c, ...]."""

import numpy as np
import pytest

from megatron.data.loader import PretrainingSampler
from megatron.data.retro_dataset import RetroDataset

M, K, SEQ, EOD = 4, 2, 10, 0


class ArrayChunkDB:
    def __init__(self, num_chunks, invalid=()):
        self.valid = np.ones(num_chunks, dtype=bool)
        self.valid[list(invalid)] = False

    eod = EOD

    def get_tokens(self, ids, align_to=None):
        self.last_align_to = align_to
        ids = np.asarray(ids)
        out = np.repeat(ids[..., None], 2 * M, axis=-1).astype(np.int64)
        out[ids < 0] = EOD
        return out

    def random_valid_ids(self, n, rng):
        return rng.choice(np.flatnonzero(self.valid), size=n)


class Samples:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"text": np.full(SEQ + 1, i, dtype=np.int64)}


def make(n=50, retrieval="on", **kw):
    num_chunks = -(-SEQ // M)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(n, num_chunks, K + 1))
    ids[0, 1, 1:] = -1  # one chunk with a single neighbour
    ids[0, 2, :] = -1  # one chunk with none
    ds = RetroDataset(Samples(n), ids, ArrayChunkDB(100, invalid=range(50, 100)), K, M, SEQ,
                      retrieval=retrieval, **kw)
    return ds, ids


def test_saved_neighbours_are_read_and_padding_masked():
    ds, ids = make()
    item = ds[0]
    assert item["neighbor_tokens"].shape == (3, K, 2 * M)
    assert np.array_equal(item["neighbor_mask"], ids[0, :, :K] >= 0)
    assert np.array_equal(item["neighbor_tokens"][0, :, 0], ids[0, 0, :K])
    # A -1 neighbour is never wrapped to a real chunk.
    assert (item["neighbor_tokens"][2] == EOD).all()
    assert (item["neighbor_tokens"][1, 1] == EOD).all()


def test_retrieval_off_masks_everything():
    ds, _ = make(retrieval="off")
    assert not ds[3]["neighbor_mask"].any()


def test_random_retrieval_draws_valid_chunks_and_keeps_padding():
    ds, ids = make(retrieval="random")
    item = ds[0]
    assert np.array_equal(item["neighbor_mask"], ids[0, :, :K] >= 0)
    drawn = item["neighbor_tokens"][item["neighbor_mask"]][:, 0]
    assert (drawn < 50).all()  # only valid chunks
    assert np.array_equal(ds[0]["neighbor_tokens"], item["neighbor_tokens"])  # deterministic


def test_training_probabilities_are_realised_in_proportion():
    ds, ids = make(n=4000, no_retrieval_prob=0.2, random_retrieval_prob=0.3)
    modes = [ds.sample_mode(i) for i in range(len(ds))]
    assert modes.count("off") / len(modes) == pytest.approx(0.2, abs=0.025)
    assert modes.count("random") / len(modes) == pytest.approx(0.3, abs=0.025)
    off = next(i for i, m in enumerate(modes) if m == "off")
    assert not ds[off]["neighbor_mask"].any()


def test_warmup_masks_exactly_the_first_iterations_batches_on_every_rank_and_after_resume():
    gbs, micro, warmup_iters = 4, 2, 3
    plain, _ = make(n=40, no_retrieval_prob=0.2, random_retrieval_prob=0.5)
    warm, _ = make(n=40, no_retrieval_prob=0.2, random_retrieval_prob=0.5, warmup_samples=warmup_iters * gbs)
    for consumed in (0, 2 * gbs):  # from the start, and resumed after two iterations
        for rank in range(gbs // micro):
            batches = list(PretrainingSampler(len(warm), consumed, micro, rank, gbs // micro))
            for step, batch in enumerate(batches, start=consumed // gbs):
                for idx in batch:
                    if step < warmup_iters:
                        assert warm.sample_mode(idx) == "off" and not warm[idx]["neighbor_mask"].any()
                    else:  # afterwards the same mix, sample for sample, as without a warm-up
                        assert warm.sample_mode(idx) == plain.sample_mode(idx)
                        assert np.array_equal(warm[idx]["neighbor_tokens"], plain[idx]["neighbor_tokens"])
    assert {plain.sample_mode(i) for i in range(warmup_iters * gbs)} != {"off"}  # the mask is the warm-up's
    with pytest.raises(ValueError, match="negative"):
        make(warmup_samples=-1)


def test_too_few_saved_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="neighbours for 5 train samples but 6"):
        RetroDataset(Samples(6), np.zeros((5, 3, K), dtype=np.int64), ArrayChunkDB(10), K, M, SEQ)
    with pytest.raises(ValueError, match="chunks per sample"):
        RetroDataset(Samples(5), np.zeros((5, 2, K), dtype=np.int64), ArrayChunkDB(10), K, M, SEQ)


def test_aligned_reads_pass_each_chunks_tokens_for_its_neighbours():
    ds, _ = make(align_neighbors=True)
    ds[7]
    # SEQ = 10 tokens in chunks of 4: the last chunk is EOD-padded; the label token is not a chunk's.
    expected = np.array([[7] * 4, [7] * 4, [7, 7, EOD, EOD]])
    assert np.array_equal(ds.chunk_db.last_align_to, expected)
    plain, _ = make()
    plain[7]
    assert plain.chunk_db.last_align_to is None

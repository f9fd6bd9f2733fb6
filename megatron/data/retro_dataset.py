"""RETRO training samples: a GPT sample plus, for each of its chunks, k retrieved neighbours.

Sample i of a split = the GPT dataset's sample i (seq_length + 1 tokens) and, for each of its
l = ceil(seq_length / m) chunks, the r = 2m tokens (neighbour chunk + continuation) of each of
the k neighbours that the work dir's query step saved for that chunk. The tokens are gathered
from the chunk DB's memory maps in one vectorised call per sample.

Retrieval modes (evaluation ablations and robustness training):
- "on": the saved neighbours;
- "off": no neighbour reaches the model (all masked);
- "random": neighbours drawn uniformly from the valid chunks of the DB, masked like the saved
  ones (a chunk that had no saved neighbour keeps none).
`no_retrieval_prob` / `random_retrieval_prob` switch a sample to "off" / "random" at random,
seeded by (seed, sample index) so a resumed run sees the same choices.
`warmup_samples` masks every neighbour of the first that many samples, whatever the mode mix:
the training loader serves samples in index order, so the first N x global-batch samples are the
first N iterations (a retrieval warm-up, which keeps the chunked cross-attention from slowing the
decoder while its representations form: docs/experiments.md).
"""

import numpy as np

RETRIEVAL_MODES = ("on", "off", "random")


class RetroDataset:
    def __init__(self, gpt_dataset, neighbor_ids: np.ndarray, chunk_db, num_neighbors: int,
                 chunk_length: int, seq_length: int, retrieval: str = "on",
                 no_retrieval_prob: float = 0.0, random_retrieval_prob: float = 0.0, seed: int = 0,
                 name: str = "train", align_neighbors: bool = False, warmup_samples: int = 0):
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval mode {retrieval!r} not in {RETRIEVAL_MODES}")
        if no_retrieval_prob + random_retrieval_prob > 1.0:
            raise ValueError("--retro-no-retrieval-prob + --retro-random-retrieval-prob exceeds 1")
        if warmup_samples < 0:
            raise ValueError(f"--retro-retrieval-warmup-iters gives a negative warm-up of {warmup_samples} samples")
        num_chunks = -(-seq_length // chunk_length)
        if len(neighbor_ids) < len(gpt_dataset):
            raise ValueError(
                f"the work dir holds neighbours for {len(neighbor_ids)} {name} samples but "
                f"{len(gpt_dataset)} are needed: rebuild the work dir with the training run's "
                f"--train-iters / --global-batch-size / --eval-interval / --eval-iters")
        if neighbor_ids.shape[1] != num_chunks:
            raise ValueError(
                f"the work dir's {name} neighbours have {neighbor_ids.shape[1]} chunks per sample, "
                f"seq length {seq_length} / chunk length {chunk_length} needs {num_chunks}")
        if neighbor_ids.shape[2] < num_neighbors:
            raise ValueError(
                f"--retro-num-neighbors {num_neighbors} exceeds the {neighbor_ids.shape[2]} "
                f"neighbours per chunk saved in the work dir")
        self.gpt_dataset = gpt_dataset
        self.neighbor_ids = neighbor_ids
        self.chunk_db = chunk_db
        self.num_neighbors = num_neighbors
        self.retrieval = retrieval
        self.no_retrieval_prob = no_retrieval_prob
        self.random_retrieval_prob = random_retrieval_prob
        self.seed = seed
        self.chunk_length, self.seq_length = chunk_length, seq_length
        self.align_neighbors = align_neighbors
        self.warmup_samples = warmup_samples

    def __len__(self):
        return len(self.gpt_dataset)

    def sample_mode(self, idx: int) -> str:
        if idx < self.warmup_samples:
            return "off"
        if self.retrieval != "on" or (self.no_retrieval_prob == 0 and self.random_retrieval_prob == 0):
            return self.retrieval
        u = np.random.default_rng((self.seed, idx)).random()
        if u < self.no_retrieval_prob:
            return "off"
        if u < self.no_retrieval_prob + self.random_retrieval_prob:
            return "random"
        return "on"

    def sample_chunks(self, text) -> np.ndarray:
        """[l, m]: the sample's chunks (what each chunk's neighbours were retrieved for), the
        last EOD-padded when m does not divide the seq length."""
        m, l = self.chunk_length, -(-self.seq_length // self.chunk_length)
        tokens = np.full(l * m, self.chunk_db.eod, dtype=np.int64)
        tokens[:self.seq_length] = np.asarray(text[:self.seq_length])
        return tokens.reshape(l, m)

    def __getitem__(self, idx: int) -> dict:
        item = dict(self.gpt_dataset[idx])
        ids = np.asarray(self.neighbor_ids[idx, :, : self.num_neighbors], dtype=np.int64)
        mask = ids >= 0
        mode = self.sample_mode(idx)
        if mode == "off":
            mask[:] = False
        elif mode == "random":
            rng = np.random.default_rng((self.seed, idx, 1))
            ids = self.chunk_db.random_valid_ids(ids.size, rng).reshape(ids.shape)
        # Masked slots are read as chunk -1 (all EOD) and ignored by the model.
        item["neighbor_tokens"] = self.chunk_db.get_tokens(np.where(mask, ids, -1),
                                                           self.sample_chunks(item["text"]) if self.align_neighbors else None)
        item["neighbor_mask"] = mask
        return item

"""A weighted blend of datasets, Megatron-style: sample i comes from dataset dataset_index[i].

The blend index is Megatron's greedy one: sample i goes to the dataset furthest behind its
target share (largest weight * i - samples taken so far), so every prefix of the blend matches
the weights as closely as whole samples allow. Each child is read in its own (already shuffled)
order: the k-th sample taken from dataset d is d's sample k.
"""

import numpy as np

from megatron.data.gpt_dataset import description_hash, load_or_build_cached

BLEND_VERSION = 1


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """Megatron's --data-path: ["prefix"] or ["0.3", "a", "0.7", "b"] -> [(weight, prefix), ...]."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if not data_path or len(data_path) % 2:
        raise ValueError(f"--data-path {' '.join(data_path)!r}: expected one prefix or weight/prefix pairs")
    pairs = []
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ValueError(f"--data-path: weight {weight!r} of {prefix!r} is not a number") from None
    if any(w < 0 for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
        raise ValueError(f"--data-path {' '.join(data_path)!r}: weights must be >= 0 with a positive sum")
    return pairs


def build_blending_indices(weights: np.ndarray, size: int) -> dict:
    """Megatron's greedy blend: each sample goes to the dataset with the largest error w*i - taken.

    A plain loop (ties go to the lower dataset index, as in Megatron); it runs once per blend,
    after which the result is read from the cache.
    """
    weights = [float(w) for w in weights]
    taken = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        t = max(i, 1)
        best, best_error = 0, weights[0] * t - taken[0]
        for d in range(1, len(weights)):
            error = weights[d] * t - taken[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here).

    Children need a `cache_key` (their own cached index's hash). `seed` is recorded in the
    description only: the greedy blend itself is deterministic.
    """

    def __init__(self, datasets, weights, size: int, seed: int, cache_dir: str):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"blend of {len(datasets)} datasets given {len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"blend of {len(datasets)} datasets: at most {np.iinfo(np.int16).max} supported")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"blend weights {weights.tolist()} must be >= 0 with a positive sum")
        self.datasets = list(datasets)
        self.weights = weights / weights.sum()
        self.size = size
        self.description = {
            "class": "BlendedDataset",
            "version": BLEND_VERSION,
            "datasets": [d.cache_key for d in self.datasets],
            "weights": self.weights.tolist(),
            "size": size,
            "seed": seed,
        }
        self.cache_key = description_hash(self.description)
        arrays = load_or_build_cached(
            cache_dir, f"{self.cache_key}-BlendedDataset", self.description,
            ("dataset_index", "dataset_sample_index"), lambda: build_blending_indices(self.weights, size))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (dataset, n) in enumerate(zip(self.datasets, needed)):
            if n > len(dataset):
                name = getattr(dataset, "path_prefix", f"dataset {d}")
                raise ValueError(f"blend takes {n} samples from {name} which has only {len(dataset)}")

    def __len__(self) -> int:
        return self.size

    def _child(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} samples")
        return int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])

    def __getitem__(self, idx: int) -> dict:
        d, i = self._child(idx)
        item = dict(self.datasets[d][i])
        item["dataset_id"] = np.int64(d)
        return item

    def get_document_ids(self, idx: int) -> np.ndarray:
        d, i = self._child(idx)
        return self.datasets[d].get_document_ids(i)

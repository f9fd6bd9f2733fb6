"""The faiss index over the chunk embeddings (inner product of unit vectors = cosine).

Any faiss `index_factory` string works. Training uses a random sample of the valid chunks'
embeddings (not the first N, which would all come from the first documents); adding goes block
by block, so the embeddings never sit in memory all at once. The index's id of a vector is its
chunk id: every chunk is added, invalid ones as zero vectors, and the query step drops those.

With faiss-gpu and a visible GPU, IVF k-means training runs on all GPUs and each rank searches
on its own GPU (where faiss has a GPU version of the index); adding runs on the CPU.
"""

import math
import os

import faiss
import numpy as np
from tqdm import tqdm

from megatron.retrieval.blocks import log
from megatron.retrieval.embedder import block_range, iter_embedding_blocks, load_embedding_block
from megatron.retrieval.workdir import WorkDir, atomic_path

# Below this many chunks exact search is fast enough and needs no training.
FLAT_LIMIT = 100_000


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_index_str(num_chunks: int) -> str:
    """A sensible index for a DB of this size, after faiss's "guidelines to choose an index":
    exact search while it is cheap, then IVF with more lists as the DB grows (HNSW to find the
    lists), with codes shrinking from full vectors to 8-bit scalars to 64-byte product codes."""
    if num_chunks < FLAT_LIMIT:
        return "Flat"
    if num_chunks < 1_000_000:
        return f"IVF{2 ** round(math.log2(8 * math.sqrt(num_chunks)))},Flat"
    if num_chunks < 10_000_000:
        return "IVF65536_HNSW32,SQ8"
    if num_chunks < 100_000_000:
        return "OPQ64_256,IVF262144_HNSW32,PQ64"
    return "OPQ64_256,IVF1048576_HNSW32,PQ64"


def make_index(index_str: str, dim: int):
    try:
        return faiss.index_factory(dim, index_str, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"--retro-index-str {index_str!r}: faiss cannot build it for dimension "
                         f"{dim}: {str(e).strip().splitlines()[-1]}") from None


def default_ntrain(index, num_valid: int) -> int:
    """40 training points per IVF list (faiss wants 39 to 256), at least 100k."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        nlist = 0
    return min(num_valid, max(100_000, 40 * nlist))


def sample_training_ids(db, ntrain: int, seed: int) -> np.ndarray:
    """ntrain distinct valid chunk ids (all of them if fewer), uniformly at random, sorted."""
    num_invalid = db.num_chunks - int(np.count_nonzero(db.valid))
    # Drawing ntrain + num_invalid ids leaves at least ntrain valid ones even in the worst case.
    draw = np.random.default_rng(seed).choice(db.num_chunks, size=min(db.num_chunks, ntrain + num_invalid),
                                              replace=False)
    return np.sort(draw[np.asarray(db.valid[draw])][:ntrain])


def read_embeddings(work_dir: str, db, dim: int, block_size: int, chunk_ids: np.ndarray) -> np.ndarray:
    """float32 embeddings of sorted chunk_ids, reading only the blocks that hold them."""
    wd = WorkDir(work_dir)
    out = np.empty((len(chunk_ids), dim), dtype=np.float32)
    blocks = chunk_ids // block_size
    for block in np.unique(blocks):
        first, last = block_range(int(block), block_size, db.num_chunks)
        try:
            values = load_embedding_block(wd.embedding_block(int(block)), last - first, dim,
                                          db.valid[first:last])
        except ValueError as e:
            raise ValueError(f"{e}; rerun --retro-tasks db-build to recompute it") from None
        rows = np.flatnonzero(blocks == block)
        out[rows] = values[chunk_ids[rows] - first]
    return out


def train_index(work_dir: str, db, dim: int, block_size: int, index_str: str, ntrain: int | None,
                seed: int) -> int:
    """Write index/trained.faiss; returns the number of training vectors used."""
    wd = WorkDir(work_dir)
    index = make_index(index_str, dim)
    used = 0
    if not index.is_trained:
        num_valid = int(np.count_nonzero(db.valid))
        ntrain = default_ntrain(index, num_valid) if ntrain is None else min(ntrain, num_valid)
        ids = sample_training_ids(db, ntrain, seed)
        log(f"index: training {index_str} on {len(ids)} random embeddings of {db.num_chunks} chunks")
        vectors = read_embeddings(work_dir, db, dim, block_size, ids)
        if gpu_available():
            try:
                ivf = faiss.extract_index_ivf(index)
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
                log(f"index: k-means on {faiss.get_num_gpus()} GPU(s)")
            except RuntimeError:
                pass  # not an IVF index: train on the CPU
        try:
            index.train(vectors)
        except RuntimeError as e:
            raise ValueError(f"--retro-index-str {index_str!r}: training on {len(ids)} vectors failed "
                             f"(too few for this index? raise --retro-index-ntrain or choose a smaller "
                             f"index): {str(e).strip().splitlines()[-1]}") from None
        used = len(ids)
    with atomic_path(wd.trained_index) as tmp:
        faiss.write_index(index, tmp)
    log(f"index: wrote {wd.trained_index}")
    return used


def add_to_index(work_dir: str, db, dim: int, block_size: int) -> None:
    """Add every chunk, block by block, to the trained index; write index/index.faiss."""
    wd = WorkDir(work_dir)
    if not os.path.isfile(wd.trained_index):
        raise ValueError(f"{wd.trained_index}: not found; run --retro-tasks index-train first")
    try:
        index = read_index_checked(wd.trained_index, 0, dim)
    except ValueError as e:
        raise ValueError(f"{e}; rerun --retro-tasks index-train to train it again") from None
    with tqdm(total=db.num_chunks, desc="adding to index", unit=" chunks") as progress:
        for _, vectors in iter_embedding_blocks(work_dir, db, dim, block_size):
            index.add(vectors)
            progress.update(len(vectors))
    with atomic_path(wd.index) as tmp:
        faiss.write_index(index, tmp)
    log(f"index: wrote {wd.index} ({index.ntotal} vectors)")


def read_index_checked(path: str, ntotal: int, dim: int):
    """The faiss index at `path`; ValueError naming the file when faiss cannot read it (truncated,
    corrupt) or it is not a trained index of `ntotal` vectors of dimension `dim`."""
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        raise ValueError(f"{path}: damaged index, unreadable ({str(e).strip().splitlines()[-1]})") from None
    if not index.is_trained or index.ntotal != ntotal or index.d != dim:
        raise ValueError(f"{path}: damaged index, it holds {index.ntotal} vectors of dimension {index.d} "
                         f"({'trained' if index.is_trained else 'untrained'}) where a trained index of "
                         f"{ntotal} vectors of dimension {dim} was expected")
    return index


def load_index(work_dir: str, num_chunks: int, dim: int, nprobe: int, ef_search: int):
    """The filled index, with its search parameters set, on the GPUs when there are some."""
    wd = WorkDir(work_dir)
    if not os.path.isfile(wd.index):
        raise ValueError(f"{wd.index}: not found; run --retro-tasks index-add first")
    try:
        index = read_index_checked(wd.index, num_chunks, dim)
    except ValueError as e:
        raise ValueError(f"{e}; rerun --retro-tasks index-build to rebuild it") from None
    set_search_params(index, nprobe, ef_search)
    if gpu_available():
        # Under torchrun every rank queries: each on its own GPU, not all on all of them.
        device = int(os.environ.get("LOCAL_RANK", 0)) % faiss.get_num_gpus()
        resources = faiss.StandardGpuResources()
        try:
            index = faiss.index_cpu_to_gpu(resources, device, index)
            index.referenced_objects = [resources]  # the GPU index must not outlive them
        except RuntimeError as e:  # some index types have no GPU version
            log(f"index: searching on the CPU ({str(e).strip().splitlines()[-1]})")
    return index


def set_search_params(index, nprobe: int, ef_search: int) -> None:
    """nprobe / efSearch where the index has them (faiss caps nprobe at the number of lists)."""
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("quantizer_efSearch", ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index has no such parameter

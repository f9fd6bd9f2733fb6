"""The mmap indexed dataset: round trips, and the exact Megatron-LM byte layout checked against a
reader written here from the format description alone."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_fitting_dtype

# From the format description, not from the module under test.
FORMAT_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                      np.float64: 6, np.float32: 7, np.uint16: 8}


def read_index_independently(idx_path):
    """Parse an .idx with struct only: (version, dtype code, lengths, pointers, document indices)."""
    with open(idx_path, "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, code, sequence_count, document_count = struct.unpack_from("<QBQQ", data, 9)
    offset = 9 + 8 + 1 + 8 + 8
    lengths = struct.unpack_from(f"<{sequence_count}i", data, offset)
    offset += 4 * sequence_count
    pointers = struct.unpack_from(f"<{sequence_count}q", data, offset)
    offset += 8 * sequence_count
    document_indices = struct.unpack_from(f"<{document_count}q", data, offset)
    offset += 8 * document_count
    assert offset == len(data), "trailing bytes after the document indices"
    return version, code, list(lengths), list(pointers), list(document_indices)


def random_documents(rng, dtype, n):
    lengths = rng.integers(0, 40, size=n)
    lengths[0] = 0  # an empty document must survive too
    if np.issubdtype(dtype, np.floating):
        return [rng.standard_normal(k).astype(dtype) for k in lengths]
    info = np.iinfo(dtype)
    return [rng.integers(info.min, info.max, size=k, endpoint=True, dtype=dtype) for k in lengths]


def build(prefix, documents, dtype):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(document)
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64,
                                   np.float32, np.float64])
def test_round_trip_and_byte_layout(tmp_path, dtype):
    rng = np.random.default_rng(FORMAT_DTYPE_CODES[dtype])
    documents = random_documents(rng, dtype, 25)
    prefix = str(tmp_path / "data")
    build(prefix, documents, dtype)

    ds = IndexedDataset(prefix)
    assert len(ds) == len(documents)
    assert ds.dtype == dtype
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(ds[i], document)
        assert ds[i].dtype == dtype
    assert ds.sequence_lengths.dtype == np.int32
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in documents])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(documents) + 1))

    version, code, lengths, pointers, document_indices = read_index_independently(prefix + ".idx")
    itemsize = np.dtype(dtype).itemsize
    assert version == 1
    assert code == FORMAT_DTYPE_CODES[dtype]
    assert lengths == [len(d) for d in documents]
    assert pointers == [itemsize * sum(lengths[:i]) for i in range(len(documents))]
    assert document_indices == list(range(len(documents) + 1))
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == b"".join(np.asarray(d, dtype=dtype).tobytes() for d in documents)


def test_exact_bytes_of_a_tiny_dataset(tmp_path):
    prefix = str(tmp_path / "tiny")
    build(prefix, [[1, 2, 3], [65000]], np.uint16)
    expected_idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                    + struct.pack("<QQ", 2, 3) + struct.pack("<2i", 3, 1)
                    + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2))
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == expected_idx
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == struct.pack("<4H", 1, 2, 3, 65000)


def test_reads_an_index_written_independently(tmp_path):
    """A file laid out by hand, with several sequences per document as Megatron-LM may write."""
    prefix = str(tmp_path / "foreign")
    sequences = [[7, 8], [9], [10, 11, 12]]
    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<6q", 7, 8, 9, 10, 11, 12))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 5, 3, 3))
        f.write(struct.pack("<3i", 2, 1, 3) + struct.pack("<3q", 0, 16, 24) + struct.pack("<3q", 0, 2, 3))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int64
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3])


def test_get_slices_without_copying(tmp_path):
    prefix = str(tmp_path / "data")
    build(prefix, [np.arange(10), np.arange(100, 120)], np.int32)
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.get(1, offset=5, length=4), [105, 106, 107, 108])
    np.testing.assert_array_equal(ds.get(1, offset=15), np.arange(115, 120))
    np.testing.assert_array_equal(ds[-1], np.arange(100, 120))
    assert ds.get(0, offset=10).size == 0
    # A view on the read-only mapping, not a copy of the file.
    assert not ds[0].flags.writeable and not ds[0].flags.owndata
    with pytest.raises(IndexError):
        ds.get(0, offset=8, length=3)
    with pytest.raises(IndexError):
        ds[2]


def test_pickles_by_reopening(tmp_path):
    prefix = str(tmp_path / "data")
    build(prefix, [[1, 2], [3]], np.uint16)
    clone = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert [clone[i].tolist() for i in range(len(clone))] == [[1, 2], [3]]


def test_values_that_do_not_fit_the_dtype_are_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_document([1, 70000])
    builder.discard()
    assert os.listdir(tmp_path) == []


def test_only_final_files_remain_and_failed_builds_leave_nothing(tmp_path):
    build(str(tmp_path / "ok"), [[1]], np.int32)
    assert sorted(os.listdir(tmp_path)) == ["ok.bin", "ok.idx"]
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "failed.bin")) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("tokenizer crashed")
    assert sorted(os.listdir(tmp_path)) == ["ok.bin", "ok.idx"]


@pytest.fixture
def valid_prefix(tmp_path):
    prefix = str(tmp_path / "data")
    build(prefix, [np.arange(5), np.arange(7)], np.int32)
    return prefix


def rewrite(path, transform):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(transform(data))


@pytest.mark.parametrize("keep", [-8, 20])  # cut inside the document indices; inside the header
def test_truncated_index_is_an_error_naming_the_file(valid_prefix, keep):
    rewrite(valid_prefix + ".idx", lambda data: data[:keep])
    with pytest.raises(ValueError, match="truncated") as error:
        IndexedDataset(valid_prefix)
    assert valid_prefix + ".idx" in str(error.value)


def test_corrupted_magic_is_an_error_naming_the_file(valid_prefix):
    rewrite(valid_prefix + ".idx", lambda data: b"XXIDIDX\x00\x00" + data[9:])
    with pytest.raises(ValueError, match="magic") as error:
        IndexedDataset(valid_prefix)
    assert valid_prefix + ".idx" in str(error.value)


def test_unknown_dtype_code_is_an_error(valid_prefix):
    rewrite(valid_prefix + ".idx", lambda data: data[:17] + bytes([42]) + data[18:])
    with pytest.raises(ValueError, match="dtype code 42"):
        IndexedDataset(valid_prefix)


def test_bin_shorter_than_the_index_says_is_an_error_naming_it(valid_prefix):
    rewrite(valid_prefix + ".bin", lambda data: data[:-4])
    with pytest.raises(ValueError, match="shorter") as error:
        IndexedDataset(valid_prefix)
    assert valid_prefix + ".bin" in str(error.value)


def test_best_fitting_dtype():
    assert best_fitting_dtype(8192) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(128256) == np.int32

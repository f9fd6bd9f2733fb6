"""Megatron-LM's memory-mapped indexed dataset: token sequences in a .bin, their layout in an .idx.

The byte layout is Megatron-LM's, so files are interchangeable with it. The .idx holds, little endian:

    magic            b"MMIDIDX\\x00\\x00"
    version          <Q  (1)
    dtype code       <B  (see DTYPE_CODES)
    sequence_count   <Q
    document_count   <Q  (entries of document_indices, i.e. number of documents + 1)
    sequence_lengths    int32[sequence_count]   (in tokens)
    sequence_pointers   int64[sequence_count]   (byte offsets into the .bin)
    document_indices    int64[document_count]   (0, then the first sequence after each document)

The .bin is the sequences' tokens back to back. In this project one sequence is one document.
Both files are read through mmap, so opening a dataset costs no more than its index.
"""

import hashlib
import mmap
import operator
import os
import re
import struct
import uuid

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's dtype codes; the numbering is part of the file format.
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


FINGERPRINT_PAGES = 1024
FINGERPRINT_PAGE_BYTES = 4096


def content_fingerprint(path_prefix: str) -> str:
    """A fingerprint of an indexed dataset's content, cheap at terabyte scale: SHA-256 over the
    whole .idx, the .bin's size and FINGERPRINT_PAGES evenly spaced 4 KiB pages of the .bin
    (first and last included; the whole .bin when it has no more pages). It reads the .idx
    (~12 bytes per document) and at most 4 MiB of the .bin.

    It catches any change to the .idx (documents added, removed, resized), any change of the
    .bin's size, any in-place change of a .bin of at most 4 MiB, and in a larger .bin every
    in-place change that touches a sampled page, which includes every contiguous rewrite longer
    than about 1/1000 of the file. It cannot catch a same-size edit that falls only between
    sampled pages (a few tokens changed, one document rewritten to its old length) nor an edit
    made to avoid the fixed sample positions; `--retro-tasks verify`, which re-embeds chunks,
    is the check for those."""
    idx_path, bin_path = path_prefix + ".idx", path_prefix + ".bin"
    try:
        with open(idx_path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        with open(bin_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(struct.pack("<Q", size))
            num_pages = -(-size // FINGERPRINT_PAGE_BYTES)
            for page in np.unique(np.linspace(0, num_pages - 1, min(num_pages, FINGERPRINT_PAGES)).round()):
                f.seek(int(page) * FINGERPRINT_PAGE_BYTES)
                digest.update(f.read(FINGERPRINT_PAGE_BYTES))
    except OSError as e:
        raise ValueError(f"{e.filename}: cannot read the indexed dataset to fingerprint it: {e.strerror}") from e
    return "sha256-sampled:" + digest.hexdigest()


def best_fitting_dtype(vocab_size: int):
    """The smallest token dtype Megatron-LM uses for a vocabulary of this size."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _temp_path_beside(path: str) -> str:
    """An unused name next to `path` (same filesystem, so os.replace is atomic). Not mkstemp:
    its 0600 mode would stick to the renamed file."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def remove_stale_temp_files(path: str) -> int:
    """Delete the temporary files `_temp_path_beside(path)` made for processes that no longer run
    (a build killed with -9 leaves them); a live process's are kept. Returns how many went."""
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.[0-9a-f]{8}\.tmp")
    removed = 0
    for entry in os.listdir(directory) if os.path.isdir(directory) else ():
        match = pattern.fullmatch(entry)
        if match and not _process_alive(int(match.group(1))):
            os.remove(os.path.join(directory, entry))
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class IndexedDatasetBuilder:
    """Writes sequences to `bin_path` one document at a time; `finalize` writes the index.

    Both files are written under temporary names and renamed into place by `finalize`, so a
    reader never sees a half-written dataset. Use as a context manager, or call `discard`, to
    remove the temporary files when building fails.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"{bin_path}: dtype {self.dtype} has no code in the indexed dataset format")
        self.bin_path = bin_path
        self._temp_bin = _temp_path_beside(bin_path)
        self._bin = open(self._temp_bin, "xb")
        self._lengths = []
        self._finished = False

    def add_document(self, tokens) -> None:
        """Append one document, stored as one sequence."""
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise ValueError(f"{self.bin_path}: a document must be 1-D, got shape {values.shape}")
        converted = values.astype(self.dtype, copy=False)
        # Refuse values the dtype cannot hold instead of silently wrapping them.
        if len(values) and not np.array_equal(converted, values):
            raise ValueError(f"{self.bin_path}: document values do not fit in dtype {self.dtype}")
        self._bin.write(converted.tobytes(order="C"))
        self._lengths.append(len(converted))

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            self.discard()
            raise ValueError(f"{self.bin_path}: a document is longer than the format's int32 length")
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)

        temp_idx = _temp_path_beside(idx_path)
        try:
            with open(temp_idx, "xb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype],
                                     len(lengths), len(document_indices)))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(document_indices.astype("<i8").tobytes())
            # .bin first: whoever sees the new .idx also sees its .bin.
            os.replace(self._temp_bin, self.bin_path)
            os.replace(temp_idx, idx_path)
        except BaseException:
            _remove_if_present(temp_idx)
            self.discard()
            raise
        self._finished = True

    def discard(self) -> None:
        """Remove the temporary files of an unfinished build."""
        if not self._finished:
            self._bin.close()
            _remove_if_present(self._temp_bin)
            self._finished = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.discard()


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _map_file(path: str):
    """A read-only buffer over the whole file (an empty bytes object for an empty file,
    which mmap refuses)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Reads `prefix.idx` and `prefix.bin` memory-mapped; `ds[i]` is sequence i."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self.idx_path = path_prefix + ".idx"
        self.bin_path = path_prefix + ".bin"
        self._read_index()
        self._check_bin()

    def _read_index(self) -> None:
        path = self.idx_path
        self._idx_buffer = _map_file(path)
        size = len(self._idx_buffer)
        if size < _HEADER.size:
            raise ValueError(f"{path}: truncated index, {size} bytes is shorter than the "
                             f"{_HEADER.size}-byte header")
        magic, version, code, sequence_count, document_count = _HEADER.unpack_from(self._idx_buffer, 0)
        if magic != MAGIC:
            raise ValueError(f"{path}: not an indexed dataset index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"{path}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{path}: unknown dtype code {code}")
        expected = _HEADER.size + sequence_count * (4 + 8) + document_count * 8
        if size != expected:
            raise ValueError(f"{path}: index is {size} bytes but its header "
                             f"({sequence_count} sequences, {document_count} document indices) "
                             f"implies {expected} bytes; the file is truncated or corrupt")
        self.dtype = DTYPE_CODES[code]
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx_buffer, dtype="<i4", count=sequence_count,
                                              offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(self._idx_buffer, dtype="<i8", count=sequence_count,
                                               offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(self._idx_buffer, dtype="<i8", count=document_count,
                                              offset=offset)

        indices = self.document_indices
        if (document_count == 0 or indices[0] != 0 or indices[-1] != sequence_count
                or np.any(np.diff(indices) < 0)):
            raise ValueError(f"{path}: document indices must rise from 0 to the sequence count "
                             f"{sequence_count}")
        if np.any(self.sequence_lengths < 0):
            raise ValueError(f"{path}: negative sequence length")
        # Pointers must be the running byte offsets, so every read stays inside its sequence.
        byte_lengths = self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        if sequence_count and (self.sequence_pointers[0] != 0 or not np.array_equal(
                self.sequence_pointers[1:], np.cumsum(byte_lengths[:-1]))):
            raise ValueError(f"{path}: sequence pointers do not match the sequence lengths")
        self._bin_bytes_expected = int(byte_lengths.sum())

    def _check_bin(self) -> None:
        self._bin_buffer = _map_file(self.bin_path)
        size = len(self._bin_buffer)
        if size != self._bin_bytes_expected:
            problem = "shorter" if size < self._bin_bytes_expected else "longer"
            raise ValueError(f"{self.bin_path}: data file is {size} bytes, {problem} than the "
                             f"{self._bin_bytes_expected} bytes its index {self.idx_path} describes")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i) -> np.ndarray:
        return self.get(i)

    def get(self, i, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, read-only, without reading the rest."""
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path_prefix}: sequence {i} out of range for {n} sequences")
        sequence_length = int(self.sequence_lengths[i])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"{self.path_prefix}: tokens [{offset}, {offset + length}) out of range "
                             f"for sequence {i} of length {sequence_length}")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buffer, dtype=self.dtype, count=length, offset=start)

    def max_token(self) -> int:
        """The largest token id in the .bin (-1 when empty). Reads the whole file once, in 64 MiB
        slices, so memory stays bounded whatever its size."""
        tokens = np.frombuffer(self._bin_buffer, dtype=self.dtype)
        step = (64 << 20) // self.dtype.itemsize
        return max((int(tokens[i:i + step].max()) for i in range(0, len(tokens), step)), default=-1)

    # mmap objects cannot be pickled; DataLoader workers reopen the files instead.
    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

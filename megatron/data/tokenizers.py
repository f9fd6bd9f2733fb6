"""Tokenizers behind one small interface: tokenize (and tokenize_pieces, the same ids for long
texts in bounded memory), detokenize, vocab_size, eod, fingerprint.

Both kinds are byte-level BPE run by the HF `tokenizers` library (no `transformers` import):
- "HuggingFaceTokenizer": a `tokenizer.json` (as written by tools/train_tokenizer.py);
- "GPT2BPETokenizer": GPT-2's vocab.json + merges.txt.
The end-of-document token is "<|endoftext|>" in both (or a HF directory's eos_token where its
vocabulary has none). The fingerprint is the sha256 of the exact
bytes the tokenizer was loaded from, so a work dir can tell when it was built with another one.
"""

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")

# Characters encoded at a time by tokenize_pieces. An encode holds ~150 bytes per character
# (ids, offsets, token strings, alignments): ~10 MB here. Not larger: glibc then serves the
# buffers of later pieces from the heap (its mmap threshold rises to the size of the first freed
# one), where they fragment: 1 Mi-character pieces left ~1 GB of freed memory in the RSS of a
# 50 MB document, these 10-20 MB, at no cost in speed (benchmarks/preprocess_memory.py).
PIECE_CHARS = 1 << 16
# A piece's last 1/64 is not trusted (its last pre-token is cut, and pre-tokenizers look ahead);
# the 1/64 before that is encoded again by the next piece, which must reproduce it: ~3% extra work.
MARGIN_FRACTION = 64


def _read_bytes(path: str, what: str) -> bytes:
    if not path:
        raise ValueError(f"a {what} path is required")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        return f.read()


class _ByteLevelBPETokenizer:
    """Wraps a `tokenizers.Tokenizer`; subclasses only differ in how they load it."""

    def __init__(self, tokenizer: Tokenizer, source: str, fingerprint: str, eod_token: str = EOD_TOKEN):
        self._tokenizer = tokenizer
        eod = tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"{source}: the vocabulary has no {eod_token!r} token")
        self.eod = eod
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fingerprint = fingerprint

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_pieces(self, text: str, piece_chars: int = PIECE_CHARS) -> Iterator[list[int]]:
        """Lists of ids whose concatenation is exactly tokenize(text), encoding about
        `piece_chars` characters at a time, so that memory does not grow with the document
        (0: the whole text in one encode).

        A piece is cut at the start of a pre-token ("word": the model never merges across one)
        near its end, and the next piece starts there. It is accepted only if the next piece
        reproduces its tokens over an overlap before the untrusted margin; otherwise the piece is
        encoded again twice as long. So a tokenizer whose pieces do not agree (a pre-token longer
        than the piece, say) ends up in one encode of the rest of the text, never in other ids."""
        if piece_chars < 0:
            raise ValueError(f"piece_chars must be 0 (whole text) or positive, not {piece_chars}")
        start, size = 0, piece_chars or len(text)
        ids, offsets, words = self._encode_span(text, start, start + size)
        while start + size < len(text):
            end, margin = start + size, size // MARGIN_FRACTION
            # Token ends never decrease, so the tokens [0, trusted) are those ending before the margin.
            trusted = int(np.searchsorted(offsets[:, 1], end - margin, side="right"))
            word_starts = np.flatnonzero(words[1:] != words[:-1]) + 1
            restarts = word_starts[(word_starts < trusted) & (offsets[word_starts, 0] >= end - 2 * margin)]
            if restarts.size:
                cut = int(restarts[0])
                restart = int(offsets[cut, 0])
                next_ids, next_offsets, next_words = self._encode_span(text, restart, restart + piece_chars)
                overlap = trusted - cut
                if (next_ids[:overlap] == ids[cut:trusted]
                        and np.array_equal(next_offsets[:overlap], offsets[cut:trusted])):
                    yield ids[:cut]
                    start, size = restart, piece_chars
                    ids, offsets, words = next_ids, next_offsets, next_words
                    continue
            size *= 2
            ids, offsets, words = self._encode_span(text, start, start + size)
        yield ids

    def _encode_span(self, text: str, start: int, stop: int):
        """ids, (start, end) character offsets into `text` and pre-token index of each token of
        text[start:stop]."""
        encoding = self._tokenizer.encode(text[start:stop], add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + start
        return encoding.ids, offsets, np.asarray(encoding.word_ids)

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint


class HuggingFaceTokenizer(_ByteLevelBPETokenizer):
    """A HF `tokenizer.json`; `path` is the file or a directory holding it. A vocabulary without
    "<|endoftext|>" (Llama-3's, SentencePiece-converted ones) ends documents with the eos_token
    of the tokenizer_config.json beside it, as a Hugging Face model directory has."""

    def __init__(self, path: str):
        if path and os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        data = _read_bytes(path, "tokenizer file")
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises plain Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
        digest = hashlib.sha256(data)
        eod_token = EOD_TOKEN
        if tokenizer.token_to_id(EOD_TOKEN) is None:
            eod_token = _config_eos_token(os.path.join(os.path.dirname(path), "tokenizer_config.json")) or EOD_TOKEN
            digest.update(eod_token.encode("utf-8"))  # the same file read with another end of document
        super().__init__(tokenizer, path, digest.hexdigest(), eod_token)


def _config_eos_token(config_path: str) -> str | None:
    """The eos_token a HF tokenizer_config.json names (a string or {"content": ...}); None when
    there is no such file or field."""
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a valid tokenizer_config.json: {e}") from e
    return eos.get("content") if isinstance(eos, dict) else eos


class GPT2BPETokenizer(_ByteLevelBPETokenizer):
    """GPT-2's byte-level BPE from its vocab.json and merges.txt."""

    def __init__(self, vocab_file: str, merge_file: str):
        vocab_data = _read_bytes(vocab_file, "vocab file")
        merge_data = _read_bytes(merge_file, "merge file")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # the library raises plain Exception on malformed files
            raise ValueError(f"{vocab_file}, {merge_file}: not a valid BPE vocab/merges pair: {e}") from e
        tokenizer = Tokenizer(model)
        # GPT-2's pre-tokenization and byte mapping; no prefix space, so decoding is exact.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
        # Hash both files, each length-prefixed so moving bytes between them changes the digest.
        digest = hashlib.sha256()
        for data in (vocab_data, merge_data):
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        super().__init__(tokenizer, vocab_file, digest.hexdigest())


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_file: str | None = None, merge_file: str | None = None):
    """The tokenizer named by Megatron's --tokenizer-type and its file arguments."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (a tokenizer.json or its directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise ValueError("GPT2BPETokenizer needs --vocab-file and --merge-file")
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")

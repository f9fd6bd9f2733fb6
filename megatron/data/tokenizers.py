"""Tokenizers behind one small interface: tokenize, detokenize, vocab_size, eod, fingerprint.

Both kinds are byte-level BPE run by the HF `tokenizers` library (no `transformers` import):
- "HuggingFaceTokenizer": a `tokenizer.json` (as written by tools/train_tokenizer.py);
- "GPT2BPETokenizer": GPT-2's vocab.json + merges.txt.
The end-of-document token is "<|endoftext|>" in both. The fingerprint is the sha256 of the exact
bytes the tokenizer was loaded from, so a work dir can tell when it was built with another one.
"""

import hashlib
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")


def _read_bytes(path: str, what: str) -> bytes:
    if not path:
        raise ValueError(f"a {what} path is required")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        return f.read()


class _ByteLevelBPETokenizer:
    """Wraps a `tokenizers.Tokenizer`; subclasses only differ in how they load it."""

    def __init__(self, tokenizer: Tokenizer, source: str, fingerprint: str):
        self._tokenizer = tokenizer
        eod = tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"{source}: the vocabulary has no {EOD_TOKEN!r} token")
        self.eod = eod
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fingerprint = fingerprint

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint


class HuggingFaceTokenizer(_ByteLevelBPETokenizer):
    """A HF `tokenizer.json`; `path` is the file or a directory holding it."""

    def __init__(self, path: str):
        if path and os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        data = _read_bytes(path, "tokenizer file")
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises plain Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e
        super().__init__(tokenizer, path, hashlib.sha256(data).hexdigest())


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

"""Train a byte-level BPE tokenizer on a JSONL corpus and write DIR/tokenizer.json.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 8192 --output tok/

The result has "<|endoftext|>" as its special end-of-document token and loads with
`build_tokenizer("HuggingFaceTokenizer", "tok/")`. The same corpus and arguments give the
same file byte for byte.
"""

import argparse
import os
import sys
import uuid

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron.data.jsonl import texts_of_line
from megatron.data.tokenizers import EOD_TOKEN

# 256 byte symbols plus the end-of-document token.
MIN_VOCAB_SIZE = 257


def iter_texts(path: str, json_keys: list[str]):
    """Yield the text under each of `json_keys` for every line; bad lines raise ValueError
    naming FILE:LINE."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                texts = texts_of_line(line, json_keys)
            except ValueError as e:
                raise ValueError(f"{path}:{line_number}: {e}") from e
            yield from texts


def build_untrained_tokenizer() -> Tokenizer:
    """Byte-level BPE without a prefix space, so decode(encode(text)) == text exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(input_path: str, json_keys: list[str], vocab_size: int, output_dir: str) -> str:
    """Train on the corpus and write output_dir/tokenizer.json; returns its path."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size} is below {MIN_VOCAB_SIZE} "
                         f"(256 bytes + {EOD_TOKEN})")
    if not os.path.isfile(input_path):
        raise ValueError(f"{input_path}: input corpus not found")

    # Count documents as they stream past, to refuse an empty corpus after the pass.
    num_texts = 0

    def counted_texts():
        nonlocal num_texts
        for text in iter_texts(input_path, json_keys):
            num_texts += 1
            yield text

    tokenizer = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        # Every byte is in the vocabulary, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(counted_texts(), trainer=trainer)
    if num_texts == 0:
        raise ValueError(f"{input_path}: empty corpus, no documents to train on")

    os.makedirs(output_dir, exist_ok=True)
    output_path = os.path.join(output_dir, "tokenizer.json")
    # A unique name rather than mkstemp, whose 0600 mode would stick to the renamed file.
    temp_path = f"{output_path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tokenizer.save(temp_path)
        os.replace(temp_path, output_path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return output_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL corpus, one JSON object per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text to train on")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--output", required=True, help="directory to write tokenizer.json into")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = train_tokenizer(args.input, args.json_keys, args.vocab_size, args.output)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab_size = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    print(f"wrote {path} (vocab size {vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

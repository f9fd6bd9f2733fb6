"""The run's tokenizer, and the padded vocabulary size the model is built with."""

from megatron.data.tokenizers import build_tokenizer
from megatron.training.config import Config
from megatron.transformer.config import pad_vocab_size


def build_run_tokenizer(cfg: Config):
    """Builds the tokenizer of cfg.data and sets cfg.model.vocab_size to its vocabulary padded,
    as Megatron does, to a multiple of --make-vocab-size-divisible-by x TP size (so the
    embedding splits evenly across tensor-parallel ranks). Returns the tokenizer."""
    d = cfg.data
    if d.tokenizer_type is None:
        raise SystemExit("error: --tokenizer-type is required (HuggingFaceTokenizer or GPT2BPETokenizer)")
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_file=d.vocab_file,
                                merge_file=d.merge_file)
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    cfg.model.vocab_size = pad_vocab_size(tokenizer.vocab_size, multiple)
    return tokenizer

"""The frozen retriever: chunk tokens -> text -> BERT -> mean-pooled, L2-normalised embedding.

A chunk's text is its GPT tokens, EOD tokens removed, detokenized. BERT sees that text as
WordPiece tokens truncated to max_length (CLS and SEP included); the embedding is the mean of
the last hidden states over the real tokens only (not CLS, SEP or padding), L2-normalised. A
text with no WordPiece token gets the zero vector: such chunks are invalid in the chunk DB.

Precision (--retro-bert-precision, recorded in the work dir): fp32 by default; bf16 runs the
forward under bfloat16 autocast (the pooling stays fp32); int8 runs every Linear layer as torch's
dynamic int8 quantisation on the CPU. Both move the embeddings (benchmarks/retro_preprocess.py
measures by how much, and the neighbours' recall against fp32 exact search); fp32 is unchanged.

Any local Hugging Face BERT-like directory works; its width comes from its config. The DB's
embeddings are written as float16 blocks of block_size chunks, each under a temporary name then
renamed, so a restarted run keeps every finished block and redoes a missing or corrupt one.
"""

import contextlib
import hashlib
import os
import warnings

import numpy as np
import torch
from tqdm import tqdm

from megatron.retrieval.blocks import BlockBudget, log
from megatron.retrieval.workdir import WorkDir, save_npy

# Stored embeddings are unit vectors rounded to float16: norms stay well within this of 1.
NORM_TOLERANCE = 1e-2
PRECISIONS = ("fp32", "bf16", "int8")


def _check_model_dir(model_dir: str) -> None:
    if not model_dir or not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir}: retriever model directory not found (--retro-bert-model)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a Hugging Face model directory, it has no config.json "
                         f"(--retro-bert-model)")


def retriever_info(model_dir: str) -> dict:
    """The retriever's embedding width (from its config) and a sha256 over its top-level files,
    so a work dir notices a different model even at the same path."""
    _check_model_dir(model_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not name.startswith("."):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    digest.update(piece)
    return {"embedding_dim": int(config.hidden_size), "fingerprint": digest.hexdigest(),
            "max_position_embeddings": int(getattr(config, "max_position_embeddings", 0) or 0)}


def default_device() -> torch.device:
    """One GPU per rank when there are GPUs (LOCAL_RANK under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


class DynamicInt8Linear(torch.nn.Module):
    """A Linear run as torch.ops.quantized.linear_dynamic: the weight quantised once to int8,
    symmetric per output channel; each input tensor quantised on the fly with one scale for the
    whole tensor (so a text's embedding depends a little on the other texts and the padding of
    its batch), with reduce_range (7-bit activations: torch's default, exact on CPUs without
    VNNI too). The same computation as torch.ao.quantization.quantize_dynamic with
    per_channel_dynamic_qconfig, whose scales (max |w| / 127.5, at least float32 eps) it
    copies, without that Python API. torch 2.13 deprecates both it and quantized tensors in
    favour of torchao (not a dependency here); the ops still run. CPU only."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps).double()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch.quantize_per_channel(weight, scales, torch.zeros(len(scales), dtype=torch.long),
                                                 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features = linear.out_features
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


def quantize_linears_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every nn.Linear of `model` (in place) by a DynamicInt8Linear; returns model."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, DynamicInt8Linear(child))
        else:
            quantize_linears_int8(child)
    return model


class BertEmbedder:
    """Embeds texts with a local BERT under no_grad, at `precision` (PRECISIONS; int8 always on
    the CPU: torch's quantised Linear runs nowhere else). The model loads on first use, so
    counting tokens (what the chunk DB needs) costs only the tokenizer."""

    def __init__(self, model_dir: str, max_length: int, batch_size: int, device=None, precision: str = "fp32"):
        _check_model_dir(model_dir)
        from transformers import AutoTokenizer

        if precision not in PRECISIONS:
            raise ValueError(f"retriever precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.model_dir = model_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        if precision == "int8":
            device = "cpu"
        self.device = torch.device(device) if device is not None else default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit is not None and self.max_length > limit:
                raise ValueError(f"{self.model_dir}: --retro-bert-max-chunk-length {self.max_length} "
                                 f"exceeds the model's {limit} positions")
            model = model.float().to(self.device).eval()
            self._model = quantize_linears_int8(model) if self.precision == "int8" else model
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """WordPiece tokens of each text, special tokens not counted."""
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return np.array([len(ids) for ids in encoded], dtype=np.int64)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        """float32 [n, D] unit vectors; zero rows for texts without WordPiece tokens."""
        model = self.model
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                 return_special_tokens_mask=True)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
        # Batches of similar lengths waste little on padding; the sort is stable so the batches,
        # hence the results, are the same on every run.
        order = np.argsort(lengths, kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for first in range(0, len(texts), self.batch_size):
            batch = order[first:first + self.batch_size]
            width = int(lengths[batch].max())
            ids = np.full((len(batch), width), pad, dtype=np.int64)
            real = np.zeros((len(batch), width), dtype=bool)
            attention = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                n = lengths[i]
                ids[row, :n] = encoded["input_ids"][i]
                attention[row, :n] = 1
                real[row, :n] = np.asarray(encoded["special_tokens_mask"][i]) == 0
            with torch.no_grad():
                with self._autocast():
                    hidden = model(input_ids=torch.from_numpy(ids).to(self.device),
                                   attention_mask=torch.from_numpy(attention).to(self.device)).last_hidden_state
                hidden = hidden.float()  # a no-op in fp32 and int8
                mask = torch.from_numpy(real).to(self.device).unsqueeze(-1).to(hidden.dtype)
                counts = mask.sum(dim=1)
                mean = (hidden * mask).sum(dim=1) / counts.clamp(min=1)
                unit = torch.nn.functional.normalize(mean, dim=-1) * (counts > 0)
            out[batch] = unit.float().cpu().numpy()
            if progress is not None:
                progress.update(len(batch))
        return out


def chunk_texts(tokens: np.ndarray, eod: int, gpt_tokenizer) -> list[str]:
    """The retriever's text of each row of chunk tokens: EOD removed, detokenized."""
    return [gpt_tokenizer.detokenize(row[row != eod]) for row in np.asarray(tokens)]


def block_range(block: int, block_size: int, num_chunks: int) -> tuple[int, int]:
    return block * block_size, min(num_chunks, (block + 1) * block_size)


def load_embedding_block(path: str, num_rows: int, dim: int, valid: np.ndarray) -> np.ndarray:
    """A stored block, checked: ValueError naming the file and the problem when it is missing,
    unreadable, of the wrong shape or type, or holds values no embedding step writes."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: embedding block missing")
    try:
        block = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt embedding block, unreadable ({e})") from e
    if block.dtype != np.float16 or block.shape != (num_rows, dim):
        raise ValueError(f"{path}: corrupt embedding block, {block.dtype} {block.shape} where "
                         f"float16 {(num_rows, dim)} was expected")
    values = np.asarray(block, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: corrupt embedding block, it holds non-finite values")
    norms = np.linalg.norm(values, axis=1)
    valid = np.asarray(valid, dtype=bool)
    if np.any(np.abs(norms[valid] - 1) > NORM_TOLERANCE) or np.any(norms[~valid] != 0):
        raise ValueError(f"{path}: corrupt embedding block, rows are not unit vectors "
                         f"(valid chunks) and zero vectors (invalid chunks)")
    return values


def embed_chunk_db(work_dir: str, db, embedder: BertEmbedder, gpt_tokenizer, block_size: int,
                   rank: int = 0, world_size: int = 1, budget: BlockBudget | None = None) -> int:
    """Embed this rank's blocks (block b goes to rank b % world_size) that are not done yet;
    returns the number computed."""
    wd = WorkDir(work_dir)
    num_blocks = -(-db.num_chunks // block_size)
    mine = range(rank, num_blocks, world_size)
    todo = []
    for block in mine:
        path = wd.embedding_block(block)
        if os.path.exists(path):
            first, last = block_range(block, block_size, db.num_chunks)
            try:
                load_embedding_block(path, last - first, embedder.dim, db.valid[first:last])
                continue
            except ValueError as e:
                log(f"{e}; computing it again")
        todo.append(block)
    log(f"embeddings: {len(mine) - len(todo)} of this rank's {len(mine)} blocks already done, "
        f"{len(todo)} to compute")
    total = 0
    for block in todo:
        first, last = block_range(block, block_size, db.num_chunks)
        total += last - first
    with tqdm(total=total, desc="embedding chunks", unit=" chunks") as progress:
        for block in todo:
            first, last = block_range(block, block_size, db.num_chunks)
            texts = chunk_texts(db.get_chunk_tokens(np.arange(first, last)), db.eod, gpt_tokenizer)
            embeddings = embedder.embed(texts, progress)
            empty = ~np.any(embeddings != 0, axis=1)
            if not np.array_equal(empty, ~np.asarray(db.valid[first:last])):
                raise ValueError(f"{wd.valid}: the chunk DB's valid mask disagrees with the retriever "
                                 f"on chunks {first}..{last - 1}; rebuild the chunk DB")
            save_npy(wd.embedding_block(block), embeddings.astype(np.float16))
            if budget is not None:
                budget.block_done()
    if todo:
        log(f"embeddings: wrote {len(todo)} blocks to {wd.embeddings_dir}")
    return len(todo)


def iter_embedding_blocks(work_dir: str, db, dim: int, block_size: int):
    """(first chunk id, float32 embeddings) of every block in order, each checked; one block in
    memory at a time."""
    wd = WorkDir(work_dir)
    for block in range(-(-db.num_chunks // block_size)):
        first, last = block_range(block, block_size, db.num_chunks)
        path = wd.embedding_block(block)
        try:
            values = load_embedding_block(path, last - first, dim, db.valid[first:last])
        except ValueError as e:
            raise ValueError(f"{e}; rerun --retro-tasks db-build to recompute it") from None
        yield first, values

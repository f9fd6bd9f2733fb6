"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, RNG, data position.

Layout (Megatron's names):

    SAVE/iter_0000020/                    one complete checkpoint: DCP shards + .metadata, config.json
    SAVE/latest_checkpointed_iteration.txt   the iteration to resume from

A save writes into `SAVE/iter_0000020.tmp-<pid>` and renames it to `SAVE/iter_0000020` only once
every rank has finished; the tracker file is then replaced atomically. A process killed while
saving therefore leaves a `.tmp-` directory that is never loaded and an untouched tracker.
Loading takes the tracker's iteration (or --ckpt-step), and only ever a directory with the
final name and DCP's `.metadata` file (written last by DCP).

DCP stores model and optimizer state under parameter names (get_state_dict strips DDP/FSDP
wrappers), so a checkpoint loads under another parallel layout. RNG states differ per rank and
are stored per rank (`rng.rank_<r>`); a run resumed with another world size keeps its fresh RNG.

Loading never runs code from the checkpoint. DCP itself unpickles `.metadata` with `pickle.load`
and non-tensor entries with `torch.load(weights_only=False)`, so a planted pickle would execute.
Every reader here (`read_metadata`, `dcp_load`) instead unpickles `.metadata` with an allow-list of
DCP's metadata classes, and non-tensor entries with torch's weights-only unpickler (plus numpy's
array classes, for the numpy RNG state); anything else is refused with an error naming the file.
"""

import contextlib
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import warnings
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megatron.parallel.ranks import barrier, is_distributed, rank_and_world_size
from megatron.transformer.config import ModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.json"
METADATA_FILE = ".metadata"
_DIR_RE = re.compile(r"^iter_(\d{7})$")
_TMP_RE = re.compile(r"^iter_\d{7}\.(tmp|old)-\d+$")

# Model fields that may change between a checkpoint and the run that loads it.
_RESUMABLE_MODEL_FIELDS = {"hidden_dropout", "attention_dropout", "init_method_std"}
# Fields that follow from others unless given (ffn_hidden_size from --hidden-size and --swiglu,
# max_position_embeddings from --seq-length, vocab_size from the tokenizer and
# --make-vocab-size-divisible-by): compared last, so a mismatch names the flag the user gave.
_DERIVED_MODEL_FIELDS = ("ffn_hidden_size", "max_position_embeddings", "vocab_size")
# The flag that turns a boolean model field off, where there is one.
_MODEL_OFF_FLAGS = {"swiglu": "--no-swiglu", "add_bias_linear": "--disable-bias-linear"}


@dataclass
class TrainState:
    """Where training stands: the data position is global (samples of the global batch), so a
    run resumed with another data-parallel size continues with the next unseen samples."""
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return _DIR_RE.match(os.path.basename(os.path.normpath(path))) is not None and \
        os.path.isfile(os.path.join(path, METADATA_FILE))


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _DIR_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def read_tracker(root: str) -> int | None:
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def find_checkpoint(root: str, step: int | None = None) -> tuple[int, str] | None:
    """(iteration, directory) to load from `root`, or None when it holds no complete checkpoint.

    `step` asks for one iteration and fails if that checkpoint is not complete. Otherwise the
    tracker's iteration is used; should that directory be missing or incomplete (e.g. deleted
    by hand) the newest complete checkpoint is taken instead.
    """
    if step is not None:
        path = checkpoint_dir(root, step)
        if not is_complete(path):
            raise ValueError(f"{path}: no complete checkpoint (missing directory or {METADATA_FILE})")
        return step, path
    tracked = read_tracker(root)
    if tracked is not None and is_complete(checkpoint_dir(root, tracked)):
        return tracked, checkpoint_dir(root, tracked)
    complete = list_checkpoints(root)
    if not complete:
        return None
    if tracked is not None:
        print(f"WARNING: {os.path.join(root, TRACKER_FILE)} names iteration {tracked}, whose checkpoint is "
              f"incomplete; loading the newest complete one, {complete[-1][1]}", flush=True)
    return complete[-1]


@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns on every single-process save/load that it assumes one process; that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class UntrustedCheckpointError(ValueError):
    """A checkpoint file holds a pickled object outside the allow-list; nothing of it was run."""


# What DCP's `.metadata` pickle may name: its metadata dataclasses, the path it records, dtypes.
_METADATA_GLOBALS = {(cls.__module__, cls.__qualname__): cls for cls in (
    dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo,
    pathlib.PosixPath, pathlib.WindowsPath, torch.Size, torch.device, torch.serialization._get_layout)}

# numpy's RNG state (a uint32 array) is the one non-torch object the non-tensor entries hold.
_NUMPY_RNG_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class _MetadataUnpickler(pickle.Unpickler):
    # torch's weights-only unpickler reads only protocol 2; DCP writes `.metadata` in protocol 4.
    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_metadata(path: str) -> dcp_metadata.Metadata:
    """The DCP metadata of checkpoint directory `path`, unpickled through the allow-list."""
    metadata_path = os.path.join(path, METADATA_FILE)
    try:
        with open(metadata_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(f"{metadata_path}: refused to load, it is not plain DCP metadata "
                                       f"({e}); load only checkpoints you trust") from None
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{metadata_path}: cannot read the checkpoint's metadata: {e}") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"{metadata_path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read (once, already checked) by `read_metadata`."""

    def __init__(self, path: str, metadata: dcp_metadata.Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by torch's weights-only unpickler."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
                obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            file = os.path.join(self._path, self.metadata.storage_data[read_item.storage_index].relative_path)
            raise UntrustedCheckpointError(f"{file}: refused to load entry {fqn!r}, it pickles an object "
                                           f"outside the allow-list ({e}); load only checkpoints you "
                                           f"trust") from None
        set_element(self.original_state_dict, self.mappings[fqn], obj)


def dcp_load(payload: dict, path: str):
    """dcp.load of `payload` from checkpoint directory `path` without running code from it;
    collective when torch.distributed is initialised."""
    reader = _SafeReader(path, read_metadata(path))
    try:
        with _dcp_quiet():
            dcp.load(payload, storage_reader=reader, planner=_WeightsOnlyPlanner(path), no_dist=not is_distributed())
    except CheckpointException as e:  # raised on every rank when one failed: show the refusal itself
        for exc, _ in e.failures.values():
            if isinstance(exc, UntrustedCheckpointError):
                raise exc from None
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _model_and_optimizer_state(model, optimizer):
    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def save_checkpoint(root: str, state: TrainState, model: torch.nn.Module, optimizer, scheduler,
                    config: dict, keep_last_n: int | None = None) -> str:
    """Write the checkpoint of `state.iteration` under `root`; collective over all ranks.

    config: the run's configuration (e.g. dataclasses.asdict(cfg)), written as config.json for
    people and for the architecture check on load.
    """
    rank, _ = rank_and_world_size()
    final = checkpoint_dir(root, state.iteration)
    # Every rank must write into the same temporary directory: rank 0's pid names it.
    owner = [os.getpid()]
    if is_distributed():
        dist.broadcast_object_list(owner, src=0)
    tmp = f"{final}.tmp-{owner[0]}"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()

    model_sd, optim_sd = _model_and_optimizer_state(model, optimizer)
    payload = {"model": model_sd, "train_state": asdict(state), "rng": {f"rank_{rank}": rng_state()}}
    if optim_sd is not None:
        payload["optimizer"] = optim_sd
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    with _dcp_quiet():
        dcp.save(payload, checkpoint_id=tmp, no_dist=not is_distributed())
    barrier()

    if rank == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        if os.path.exists(final):  # the same iteration saved again, e.g. by a resumed run
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, TRACKER_FILE), f"{state.iteration}\n")
        _remove_stale(root, state.iteration, keep_last_n)
    barrier()
    return final


def _remove_stale(root: str, iteration: int, keep_last_n: int | None):
    """Delete complete checkpoints older than the newest `keep_last_n` (counting the one just
    saved) and temporary directories that killed runs left behind. Checkpoints of later
    iterations (from a run this one was resumed before) are not older, so they stay."""
    for name in os.listdir(root):
        if _TMP_RE.match(name) and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last_n is None:
        return
    older = [path for it, path in list_checkpoints(root) if it < iteration]
    for path in older[:max(0, len(older) - (keep_last_n - 1))]:
        shutil.rmtree(path)


def read_checkpoint_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: cannot read the checkpoint's configuration: {e}") from e


def _model_flag(name: str, value) -> str:
    """A model field's value as the command-line flag that sets it."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else _MODEL_OFF_FLAGS.get(name, f"no {flag}")
    return f"{flag} {value}"


def check_model_config(saved: dict, current: dict, path: str):
    """Refuse a checkpoint whose architecture differs from the model about to receive it, naming
    the flag: fields given directly are compared before those derived from them."""
    # A field added since the checkpoint was saved held its default then (GQA's, RoPE scaling's).
    saved = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING} | saved
    given = [name for name in {**current, **saved} if name not in _DERIVED_MODEL_FIELDS]
    for name in given + list(_DERIVED_MODEL_FIELDS):
        have, want = saved.get(name), current.get(name)
        if name in _RESUMABLE_MODEL_FIELDS or have == want:
            continue
        if name == "vocab_size":  # --make-vocab-size-divisible-by agreed: the tokenizer differs
            raise ValueError(f"{path}: checkpoint was saved with a padded vocabulary of {have}, this run has "
                             f"{want}: another tokenizer (--tokenizer-model / --vocab-file) than the one "
                             f"it was trained with")
        raise ValueError(f"{path}: checkpoint was saved with {_model_flag(name, have)}, this run has "
                         f"{_model_flag(name, want)}")


def saved_retro_section(config: dict) -> dict | None:
    """The retro section of a checkpoint's config.json (Config.retro; checkpoints from before it
    was typed saved it as extra["retro"]), None where it has none (pretrain_gpt.py's)."""
    return config.get("retro") or config.get("extra", {}).get("retro")


def saved_add_retriever(config: dict) -> bool:
    """Whether a checkpoint's config.json is a RETRO's."""
    return bool((saved_retro_section(config) or {}).get("add_retriever"))


def check_retriever(saved: dict, add_retriever: bool, path: str):
    """Refuse a RETRO checkpoint for a GPT and the other way round, naming the flag: the model
    section alone is the same for both."""
    if saved_add_retriever(saved) and not add_retriever:
        raise ValueError(f"{path}: a RETRO checkpoint (trained with --retro-add-retriever) and this run "
                         f"builds a GPT: add --retro-add-retriever to load it")
    if add_retriever and not saved_add_retriever(saved):
        raise ValueError(f"{path}: a GPT checkpoint (trained without --retro-add-retriever) and this run "
                         f"builds a RETRO (--retro-add-retriever): drop the flag, or RETRO-fit the GPT with "
                         f"--retro-fit-from")


def load_checkpoint(root: str, model: torch.nn.Module, optimizer=None, scheduler=None, *,
                    step: int | None = None, load_optim: bool = True, load_rng: bool = True,
                    model_config: dict | None = None, add_retriever: bool | None = None) -> TrainState | None:
    """Load the checkpoint `find_checkpoint(root, step)` chooses into model (and optimizer,
    scheduler, RNG); collective over all ranks. None when `root` holds no checkpoint.

    model_config: the current model section (as a dict) to check the checkpoint's against.
    add_retriever: whether `model` is a RETRO, checked against the checkpoint (None: unchecked).
    """
    found = find_checkpoint(root, step)
    if found is None:
        return None
    iteration, path = found
    if add_retriever is not None or model_config is not None:
        saved = read_checkpoint_config(path)
        if add_retriever is not None:
            check_retriever(saved, add_retriever, path)
        if model_config is not None:
            check_model_config(saved.get("model", {}), model_config, path)
    rank, world_size = rank_and_world_size()
    saved_keys = read_metadata(path).state_dict_metadata

    with_optim = load_optim and optimizer is not None
    model_sd, optim_sd = _model_and_optimizer_state(model, optimizer if with_optim else None)
    payload = {"model": model_sd, "train_state": asdict(TrainState())}
    if with_optim:
        payload["optimizer"] = optim_sd
        if scheduler is not None:
            payload["scheduler"] = scheduler.state_dict()
    rng_key = f"rank_{rank}"
    restore_rng = load_rng and f"rng.{rng_key}.torch" in saved_keys
    if load_rng and not restore_rng:
        print(f"WARNING: {path} has no RNG state for rank {rank} (saved by another world size); "
              f"rank {rank} of {world_size} keeps its freshly seeded RNG", flush=True)
    if restore_rng:
        payload["rng"] = {rng_key: rng_state()}
    dcp_load(payload, path)

    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
    else:
        set_model_state_dict(model, payload["model"])
    if restore_rng:
        set_rng_state(payload["rng"][rng_key])
    state = TrainState(**{k: int(v) for k, v in payload["train_state"].items()})
    if state.iteration != iteration:
        raise ValueError(f"{path}: holds iteration {state.iteration}, its name says {iteration}")
    return state

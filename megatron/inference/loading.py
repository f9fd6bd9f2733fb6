"""A pretrain_retro.py checkpoint ready to generate or evaluate: its config (RETRO-fitting off,
the checkpoint holds every parameter) and its weights, without optimizer or RNG state."""

import dataclasses

import torch

from megatron.data.tokenizers import build_tokenizer
from megatron.retro.workdir import check_dataset_fingerprints, check_workdir_matches, load_workdir_config
from megatron.training import retro
from megatron.training.checkpointing import find_checkpoint, load_checkpoint
from megatron.training.config import Config


def checkpoint_config(load: str, work_dir: str, step: int | None = None) -> tuple[int, Config]:
    """(iteration, config) of the checkpoint under `load` that ``find_checkpoint(load, step)``
    chooses (the newest without `step`), pointed at `work_dir`."""
    found = find_checkpoint(load, step)
    if found is None:
        raise ValueError(f"{load}: no complete checkpoint found")
    step, path = found
    cfg = retro.config_from_checkpoint(path, work_dir)
    cfg.extra["retro"].fit_from = None  # the checkpoint holds every parameter
    return step, cfg


def load_weights(load: str, model: torch.nn.Module, step: int, cfg: Config):
    """The model weights of iteration `step` under `load` into `model`, built from `cfg` (checked
    against the checkpoint's architecture); collective over all ranks."""
    load_checkpoint(load, model, step=step, load_rng=False, model_config=dataclasses.asdict(cfg.model))


def load_for_generation(load: str, work_dir: str, device=None):
    """(model, tokenizer, cfg) from the newest checkpoint under `load`. The work dir may hold any
    datastore, but its tokenizer and chunk length must be the model's."""
    step, cfg = checkpoint_config(load, work_dir)
    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_file=d.vocab_file, merge_file=d.merge_file)
    wd_cfg = load_workdir_config(work_dir)
    check_workdir_matches(wd_cfg, tokenizer_fingerprint=tokenizer.fingerprint(),
                          chunk_length=cfg.extra["retro"].model.chunk_length)
    check_dataset_fingerprints(wd_cfg)  # neighbours' text is read from the DB datasets
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device(device):
        model = retro.model_provider(cfg)
    load_weights(load, model, step, cfg)
    return model.eval(), tokenizer, cfg

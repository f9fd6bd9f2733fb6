"""A pretrain_retro.py checkpoint ready to evaluate or generate: its config (config.json, RETRO-
fitting off: the checkpoint holds every parameter) and its weights, without optimizer or RNG
state. Beside the checkpoint format it reads, in training/: the tools that evaluate and generate
import it from here, and inference/ (the decoder and live retrieval) needs nothing of training/."""

import dataclasses
import os

import torch

from megatron.data.tokenizers import build_tokenizer
from megatron.models.retro.config import RetroConfig
from megatron.retrieval.workdir import check_dataset_fingerprints, check_workdir_matches, load_workdir_config
from megatron.training.checkpointing import (find_checkpoint, load_checkpoint, read_checkpoint_config,
                                             saved_retro_section)
from megatron.training.config import Config
from megatron.training.retro_config import RetroTrainingConfig
from megatron.training.retro_step import model_provider


def config_from_checkpoint(path: str, work_dir: str) -> Config:
    """The Config a pretrain_retro.py checkpoint directory was trained with (its config.json),
    pointed at `work_dir`."""
    saved = read_checkpoint_config(path)
    saved_retro = saved_retro_section(saved)
    if saved_retro is None:
        raise ValueError(f"{path}: not a pretrain_retro.py checkpoint (its config has no retro section)")
    # Checkpoints from before aligned neighbours were trained on the DB's chunk boundaries, and
    # those from before the encoder's embedding skip have none; their gates read unscaled logits
    # that started half open, and their retrieval path trained the neighbours' embedding.
    model = RetroConfig(**{"align_neighbors": False, "encoder_embedding_skip": False,
                           "attention_gate_logit_scale": 1.0, "attention_gate_init": 0.5,
                           "neighbor_embedding_grad": True,
                           **saved_retro["model"]})
    retro = RetroTrainingConfig(**dict(saved_retro, model=model, work_dir=os.path.abspath(work_dir)))
    return Config(**{f.name: _build(f.default_factory, saved[f.name])
                     for f in dataclasses.fields(Config) if f.name != "retro"}, retro=retro)


def _build(factory, values: dict):
    default = factory()
    known = {f.name for f in dataclasses.fields(default)}
    return dataclasses.replace(default, **{k: v for k, v in values.items() if k in known})


def checkpoint_config(load: str, work_dir: str, step: int | None = None) -> tuple[int, Config]:
    """(iteration, config) of the checkpoint under `load` that ``find_checkpoint(load, step)``
    chooses (the newest without `step`), pointed at `work_dir`."""
    found = find_checkpoint(load, step)
    if found is None:
        raise ValueError(f"{load}: no complete checkpoint found")
    step, path = found
    cfg = config_from_checkpoint(path, work_dir)
    cfg.retro.fit_from = None  # the checkpoint holds every parameter
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
                          chunk_length=cfg.retro.model.chunk_length)
    check_dataset_fingerprints(wd_cfg)  # neighbours' text is read from the DB datasets
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device(device):
        model = model_provider(cfg)
    load_weights(load, model, step, cfg)
    return model.eval(), tokenizer, cfg

"""RETRO-fitting (--retro-fit-from): a trained GPT's weights become the frozen decoder of a new
RetroModel, and only the encoder, chunked cross-attention and gates train."""

import dataclasses

import torch

from megatron.parallel.ranks import rank_and_world_size
from megatron.training.checkpointing import (
    check_model_config,
    dcp_load,
    find_checkpoint,
    read_checkpoint_config,
    read_metadata,
    saved_add_retriever,
)
from megatron.training.config import Config


def post_init(model: torch.nn.Module, cfg: Config):
    """The trainer's post_init_fn: RETRO-fitting (--retro-fit-from) loads the GPT checkpoint into
    the freshly initialised RetroModel's decoder and freezes it."""
    fit_from = cfg.retro.fit_from
    if fit_from:
        frozen = load_gpt_into_retro(fit_from, model, dataclasses.asdict(cfg.model))
        if rank_and_world_size()[0] == 0:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f" > RETRO-fitting: loaded and froze {frozen} GPT tensors from {fit_from}; training "
                  f"{trainable} encoder, CCA and gate parameters", flush=True)


def load_gpt_into_retro(root: str, model: torch.nn.Module, model_config: dict) -> int:
    """RETRO-fitting: copy the newest GPT checkpoint under `root` (a --save directory of this
    project) into the RetroModel's decoder and set requires_grad False on every parameter it
    held; the encoder, CCA, cca_norm and gates stay trainable. Returns the number of tensors.

    The decoder parameters of a RetroModel have the GPTModel's names, so the checkpoint's model
    entries map one to one; the architecture (model section of config.json) must be the same."""
    found = find_checkpoint(root)
    if found is None:
        raise ValueError(f"{root}: no complete checkpoint to RETRO-fit from (--retro-fit-from)")
    _, path = found
    saved = read_checkpoint_config(path)
    if saved_add_retriever(saved):
        raise ValueError(f"{path}: a RETRO checkpoint; --retro-fit-from takes a GPT one")
    check_model_config(saved.get("model", {}), model_config, path)
    saved_names = {key[len("model."):] for key in
                   read_metadata(path).state_dict_metadata if key.startswith("model.")}
    state = model.state_dict()
    missing = sorted(saved_names - set(state))
    if missing:
        raise ValueError(f"{path}: holds {missing[:3]}... which the RETRO model does not have")
    if not saved_names:
        raise ValueError(f"{path}: holds no model weights")
    payload = {"model": {name: state[name] for name in saved_names}}
    dcp_load(payload, path)
    with torch.no_grad():
        for name, tensor in payload["model"].items():
            if tensor.data_ptr() != state[name].data_ptr():  # DCP loads in place; copy if it did not
                state[name].copy_(tensor)
    for name, param in model.named_parameters():
        if name in saved_names:
            param.requires_grad_(False)
    return len(saved_names)

"""Consolidate a DCP checkpoint of this project into one safetensors file + its config.

    python tools/checkpoint/convert.py --load ckpt/retro [--ckpt-step 200] --output export/

writes export/model.safetensors (every model parameter, full and unsharded, whatever the parallel
layout that saved it) and export/config.json (the run's configuration: model, retro, tokenizer),
for users who take the weights elsewhere. Optimizer, scheduler and RNG states are left out. A
tied output head is stored once, under tok_embeddings.weight (config.json records the tie).
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.training.checkpointing import dcp_load, find_checkpoint, read_checkpoint_config, read_metadata

TIED_HEAD = "output.weight"
MODEL_PREFIX = "model."


def consolidated_model_state(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DCP checkpoint directory (any world size / layout).

    Only the model's entries are read: empty full-size tensors are allocated from the
    checkpoint's metadata and DCP fills them from whichever shards hold their pieces."""
    metadata = read_metadata(checkpoint_path).state_dict_metadata
    state = {key[len(MODEL_PREFIX):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.items()
             if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{checkpoint_path}: no model state in this checkpoint")
    dcp_load({"model": state}, checkpoint_path)
    return state


def convert(load: str, output: str, step: int | None = None) -> str:
    found = find_checkpoint(load, step)
    if found is None:
        raise ValueError(f"{load}: no complete checkpoint found" + (f" at iteration {step}" if step else ""))
    iteration, path = found
    config = read_checkpoint_config(path)
    state = consolidated_model_state(path)
    if not config.get("model", {}).get("untie_embeddings_and_output_weights", False):
        state.pop(TIED_HEAD, None)
    os.makedirs(output, exist_ok=True)
    # Write both files beside their final names, then rename: a killed export leaves no half file.
    weights = os.path.join(output, "model.safetensors")
    save_file(state, weights + ".tmp", metadata={"iteration": str(iteration), "source": os.path.abspath(path)})
    with open(os.path.join(output, "config.json.tmp"), "w") as f:
        json.dump(dict(config, iteration=iteration), f, indent=2, sort_keys=True)
    os.replace(weights + ".tmp", weights)
    os.replace(os.path.join(output, "config.json.tmp"), os.path.join(output, "config.json"))
    return weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--output", required=True, help="directory for model.safetensors and config.json")
    args = p.parse_args(argv)
    try:
        weights = convert(args.load, args.output, args.ckpt_step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {weights} and {os.path.join(args.output, 'config.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

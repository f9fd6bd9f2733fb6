"""Checkpoints in and out of this project: consolidation, and Hugging Face Llama-family models.

    python tools/checkpoint/convert.py --load ckpt/retro [--ckpt-step 200] --output export/

writes export/model.safetensors (every model parameter, full and unsharded, whatever the parallel
layout that saved it) and export/config.json (the run's configuration: model, retro, tokenizer),
for users who take the weights elsewhere. Optimizer, scheduler and RNG states are left out. A
tied output head is stored once, under tok_embeddings.weight (config.json records the tie).

    python tools/checkpoint/convert.py --from-hf hf/SmolLM-135M --save ckpt/smollm [--seq-length 2048]

writes a DCP checkpoint of GPTModel (iteration 0, as megatron/training/checkpointing.py writes
it) from a local LlamaForCausalLM or Qwen2ForCausalLM directory (config.json, *.safetensors,
tokenizer.json), copies the tokenizer files to ckpt/smollm/tokenizer/ and prints the flags that
build the same model: `pretrain_gpt.py --load` and `pretrain_retro.py --retro-fit-from` take it.
Nothing is downloaded. The weights are stored in fp32, the precision training keeps them in.

    python tools/checkpoint/convert.py --load ckpt/smollm --to-hf --output hf/out [--hf-dtype bfloat16]

writes the GPT part of a checkpoint (a RETRO's decoder too) back in HF layout, with the tokenizer
files of the run's --tokenizer-model directory, loadable by AutoModelForCausalLM.from_pretrained.
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.data.tokenizers import HuggingFaceTokenizer
from megatron.models.gpt.model import GPTModel, is_tied
from megatron.training.checkpointing import (
    TrainState,
    dcp_load,
    find_checkpoint,
    read_checkpoint_config,
    read_metadata,
    save_checkpoint,
)
from megatron.transformer.config import ModelConfig

TIED_HEAD = "output.weight"
MODEL_PREFIX = "model."
TOKENIZER_DIR = "tokenizer"
# What HF's AutoTokenizer and our HuggingFaceTokenizer read from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# GPTModel's names -> HF Llama/Qwen2's, outside the layers and inside layer i.
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
                  "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _found_checkpoint(load: str, step: int | None) -> tuple[int, str]:
    found = find_checkpoint(load, step)
    if found is None:
        raise ValueError(f"{load}: no complete checkpoint found" + (f" at iteration {step}" if step else ""))
    return found


def convert(load: str, output: str, step: int | None = None) -> str:
    iteration, path = _found_checkpoint(load, step)
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


def hf_name(name: str) -> str:
    """The HF Llama/Qwen2 name of a GPTModel parameter."""
    m = _LAYER_RE.match(name)
    if m:
        return f"model.layers.{m[1]}.{HF_LAYER_NAMES[m[2]]}.{m[3]}"
    module, kind = name.rsplit(".", 1)
    return f"{HF_NAMES[module]}.{kind}"


def gpt_name(name: str) -> str | None:
    """The GPTModel name of an HF Llama/Qwen2 tensor; None for one GPTModel has no place for."""
    m = _HF_LAYER_RE.match(name)
    module, kind = (m[2], m[3]) if m else name.rsplit(".", 1)
    names = {v: k for k, v in (HF_LAYER_NAMES if m else HF_NAMES).items()}
    if module not in names:
        return None
    return f"layers.{m[1]}.{names[module]}.{kind}" if m else f"{names[module]}.{kind}"


def model_parameter_names(cfg: ModelConfig) -> list[str]:
    """The tensors a GPTModel of `cfg` holds, a tied head counted once (built on meta: no memory)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return [name for name in model.state_dict() if not (name == TIED_HEAD and is_tied(model))]


def vocab_divisor(vocab_size: int, tokenizer_vocab_size: int) -> int:
    """The --make-vocab-size-divisible-by that pads the tokenizer's vocabulary to exactly the
    checkpoint's embedding rows: the smallest divisor of them whose padding reaches no further
    (so TP sizes t dividing vocab_size / divisor keep it, the padding being to divisor x t)."""
    if tokenizer_vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab_size} tokens, more than the model's "
                         f"{vocab_size} embedding rows")
    return next(d for d in range(vocab_size - tokenizer_vocab_size + 1, vocab_size + 1) if vocab_size % d == 0)


def model_config_from_hf(hf: dict, tokenizer_vocab_size: int, seq_length: int) -> ModelConfig:
    """The ModelConfig of an HF LlamaForCausalLM / Qwen2ForCausalLM config.json; refuses what
    GPTModel would compute differently."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one of {', '.join(HF_ARCHITECTURES)}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: GPTModel's SwiGLU uses silu")
    if head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window: GPTModel attends to the whole sequence")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ValueError("attention_bias and mlp_bias differ; --add-bias-linear sets both")
    # transformers 5 keeps the RoPE settings in rope_parameters, earlier versions in rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_scaling type {rope_type!r}: GPTModel has no RoPE scaling but llama3's")
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(use_rope_scaling=True, rope_scaling_factor=float(rope["factor"]),
                       rope_scaling_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_scaling_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_scaling_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    kv_heads = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None, ffn_hidden_size=hf["intermediate_size"],
        seq_length=min(seq_length, hf["max_position_embeddings"]),
        max_position_embeddings=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=vocab_divisor(hf["vocab_size"], tokenizer_vocab_size),
        normalization="RMSNorm", norm_epsilon=float(hf["rms_norm_eps"]), swiglu=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        rotary_base=float(rope["rope_theta"]), add_bias_linear=bool(hf.get("attention_bias", False)),
        add_qkv_bias=arch == "Qwen2ForCausalLM", **scaling)


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of the HF model GPTModel of `cfg` is: Qwen2 when only q/k/v carry biases."""
    qwen2 = cfg.add_qkv_bias and not cfg.add_bias_linear
    arch = "Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"
    rope_scaling = None
    if cfg.use_rope_scaling:
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_scaling_low_freq_factor,
                        "high_freq_factor": cfg.rope_scaling_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_scaling_original_max_position_embeddings}
    config = {"architectures": [arch], "model_type": HF_ARCHITECTURES[arch], "hidden_act": "silu",
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
              "rope_theta": cfg.rotary_base, "rope_scaling": rope_scaling, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
              "attention_dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch.")}
    if not qwen2:
        config.update(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
    return config


def training_flags(cfg: ModelConfig, tokenizer_dir: str) -> list[str]:
    """The flags under which pretrain_gpt.py / pretrain_retro.py build a model of `cfg` (vocab_size
    then follows from the tokenizer and --make-vocab-size-divisible-by)."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
             "--num-attention-heads", cfg.num_attention_heads]
    if cfg.num_query_groups is not None:
        flags += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    flags += ["--ffn-hidden-size", cfg.ffn_hidden_size, "--seq-length", cfg.seq_length,
              "--max-position-embeddings", cfg.max_position_embeddings,
              "--make-vocab-size-divisible-by", cfg.make_vocab_size_divisible_by,
              "--normalization", cfg.normalization, "--norm-epsilon", cfg.norm_epsilon, "--swiglu",
              "--rotary-base", cfg.rotary_base]
    if cfg.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if cfg.use_rope_scaling:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", cfg.rope_scaling_factor,
                  "--rope-scaling-low-freq-factor", cfg.rope_scaling_low_freq_factor,
                  "--rope-scaling-high-freq-factor", cfg.rope_scaling_high_freq_factor,
                  "--rope-scaling-original-max-position-embeddings",
                  cfg.rope_scaling_original_max_position_embeddings]
    flags.append("--add-bias-linear" if cfg.add_bias_linear else "--disable-bias-linear")
    if cfg.add_qkv_bias:
        flags.append("--add-qkv-bias")
    flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    return [str(f) for f in flags]


def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{hf_dir}: no *.safetensors weights (convert .bin checkpoints with transformers first)")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def copy_tokenizer(source: str, dest: str) -> list[str]:
    """Copy the tokenizer files of directory `source` (or the tokenizer.json `source`) into `dest`."""
    files = ({"tokenizer.json": source} if os.path.isfile(source) else
             {name: os.path.join(source, name) for name in TOKENIZER_FILES})
    os.makedirs(dest, exist_ok=True)
    copied = []
    for name, path in files.items():
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dest, name))
            copied.append(name)
    return copied


def from_hf(hf_dir: str, save: str, seq_length: int = 2048) -> tuple[ModelConfig, str]:
    """Write the HF model of `hf_dir` as iteration 0 of a GPTModel checkpoint under `save`;
    returns its config and the tokenizer directory the flags name."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    if find_checkpoint(save) is not None:
        raise ValueError(f"{save}: already holds a checkpoint; convert into an empty directory")
    # The tokenizer the flags name is the one training reads: its vocabulary decides the padding.
    cfg = model_config_from_hf(hf, HuggingFaceTokenizer(hf_dir).vocab_size, seq_length)
    hf_state = read_hf_weights(hf_dir)
    names = {name: gpt_name(name) for name in hf_state}
    state = {names[name]: tensor.float() for name, tensor in hf_state.items() if names[name] is not None}
    # Old checkpoints carry RoPE's inverse frequencies, which GPTModel derives from the config.
    unplaced = sorted(name for name, ours in names.items() if ours is None and "rotary_emb" not in name)
    expected = model_parameter_names(cfg)
    if unplaced or set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        raise ValueError(f"{hf_dir}: weights do not fit the config; missing {[hf_name(n) for n in missing][:3]}, "
                         f"unexpected {(unplaced + sorted(set(state) - set(expected)))[:3]}")
    with torch.device("meta"):
        model = GPTModel(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied head is absent
    if not cfg.untie_embeddings_and_output_weights:
        model.output.weight = model.tok_embeddings.weight  # assign replaced the tied parameter
    tokenizer_dir = os.path.abspath(os.path.join(save, TOKENIZER_DIR))
    copy_tokenizer(hf_dir, tokenizer_dir)
    config = {"model": dataclasses.asdict(cfg),
              "data": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir},
              "converted_from": os.path.abspath(hf_dir)}
    save_checkpoint(save, TrainState(), model, None, None, config)
    return cfg, tokenizer_dir


def to_hf(load: str, output: str, step: int | None = None, dtype: torch.dtype = torch.float32) -> str:
    """Write the GPT part of a checkpoint as an HF model directory (weights, config, tokenizer)."""
    _, path = _found_checkpoint(load, step)
    config = read_checkpoint_config(path)
    cfg = ModelConfig(**config["model"])
    state = consolidated_model_state(path)
    missing = [name for name in model_parameter_names(cfg) if name not in state]
    if missing:
        raise ValueError(f"{path}: lacks {missing[:3]} of the GPT model its config.json describes")
    hf_state = {hf_name(name): state[name].to(dtype).contiguous() for name in model_parameter_names(cfg)}
    os.makedirs(output, exist_ok=True)
    weights = os.path.join(output, "model.safetensors")
    save_file(hf_state, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2)
    tokenizer = config.get("data", {}).get("tokenizer_model")
    if tokenizer and os.path.exists(tokenizer):
        copy_tokenizer(tokenizer, output)
    else:
        print(f"WARNING: {path}: the run's --tokenizer-model {tokenizer!r} is not here; {output} has no "
              f"tokenizer files", file=sys.stderr)
    return weights


def print_training_flags(cfg: ModelConfig, save: str, tokenizer_dir: str):
    flags = " ".join(training_flags(cfg, tokenizer_dir))
    print(f"wrote {save} (iteration 0). The model's flags:\n  {flags}\n"
          f"RETRO-fit it: pretrain_retro.py --retro-add-retriever --retro-fit-from {save} <the flags> ...\n"
          f"train it on:  pretrain_gpt.py --load {save} --no-load-optim --no-load-rng <the flags> ...\n"
          f"(tensor-parallel sizes must divide {cfg.vocab_size // cfg.make_vocab_size_divisible_by}, "
          f"so that the padded vocabulary stays {cfg.vocab_size})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="checkpoint root (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--output", help="directory for model.safetensors and config.json")
    p.add_argument("--to-hf", action="store_true", help="write --output in HF Llama/Qwen2 layout")
    p.add_argument("--hf-dtype", choices=list(HF_DTYPES), default="float32", help="--to-hf weights' dtype")
    p.add_argument("--from-hf", metavar="DIR", help="a local HF LlamaForCausalLM / Qwen2ForCausalLM directory")
    p.add_argument("--save", help="--from-hf: the checkpoint root to write")
    p.add_argument("--seq-length", type=int, default=2048,
                   help="--from-hf: the training sequence length the checkpoint's config records "
                        "(at most the model's max_position_embeddings)")
    args = p.parse_args(argv)
    if args.from_hf is not None:
        if args.save is None or args.load is not None:
            p.error("--from-hf DIR takes --save CKPT (and no --load)")
    elif args.load is None or args.output is None:
        p.error("--load CKPT takes --output DIR")
    try:
        if args.from_hf is not None:
            cfg, tokenizer_dir = from_hf(args.from_hf, args.save, args.seq_length)
            print_training_flags(cfg, args.save, tokenizer_dir)
            return 0
        if args.to_hf:
            weights = to_hf(args.load, args.output, args.ckpt_step, HF_DTYPES[args.hf_dtype])
        else:
            weights = convert(args.load, args.output, args.ckpt_step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {weights} and {os.path.join(args.output, 'config.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

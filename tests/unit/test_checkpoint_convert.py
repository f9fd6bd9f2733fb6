"""tools/checkpoint/convert.py: a DCP checkpoint becomes one safetensors file that rebuilds the model;
HF Llama / Qwen2 models (grouped-query attention) convert into GPTModel checkpoints with HF's
logits, back bit-identically, and RETRO-fit with their decoder frozen."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron.models.gpt.model import GPTModel
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.training.arguments import parse_args
from megatron.training.checkpointing import TrainState, load_checkpoint, save_checkpoint
from megatron.training.config import Config, TrainingConfig
from megatron.training.lr_schedule import LRScheduler
from megatron.training.optimizer import build_optimizer
from megatron.training.retro_fit import load_gpt_into_retro
from megatron.training.tokenizer import build_run_tokenizer
from megatron.transformer.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("untie", [False, True])
def test_export_rebuilds_the_same_model(tmp_path, untie):
    cfg = Config(model=ModelConfig(vocab_size=128, num_layers=2, hidden_size=32, num_attention_heads=4,
                                   seq_length=16, untie_embeddings_and_output_weights=untie),
                 training=TrainingConfig(train_iters=4))
    torch.manual_seed(0)
    model = GPTModel(cfg.model)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.training)
    model(torch.randint(0, 128, (2, 16))).sum().backward()
    optimizer.step()  # so the optimizer state exists and must be left out
    save_checkpoint(str(tmp_path / "ckpt"), TrainState(iteration=3), model, optimizer,
                    LRScheduler(optimizer, cfg.training), dataclasses.asdict(cfg))

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--load", str(tmp_path / "ckpt"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["iteration"] == 3 and config["model"]["hidden_size"] == 32
    assert ("output.weight" in weights) == untie  # a tied head is stored once

    rebuilt = GPTModel(ModelConfig(**config["model"]))
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if not untie else set())
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))


def test_no_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--load", str(tmp_path),
                           "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and str(tmp_path) in proc.stderr and "no complete checkpoint" in proc.stderr


# HF Llama-family checkpoints in and out: tiny random models built locally with transformers.
HF_VOCAB, HF_SEQ = 320, 24
HF_KINDS = {
    # Llama-3 style: untied head, Llama-3's RoPE scaling (its original context shorter than the test's).
    "llama": dict(architectures=["LlamaForCausalLM"], rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Qwen2 style: tied head, q/k/v biases.
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, tie_word_embeddings=True),
}


def run_convert(*args):
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def printed_flags(stdout: str) -> list[str]:
    return stdout.split("The model's flags:\n", 1)[1].splitlines()[0].split()


@pytest.fixture(scope="module", params=list(HF_KINDS))
def hf_model(request, tmp_path_factory):
    """A random 2-layer model with 4 query heads sharing 2 key/value heads, saved with
    save_pretrained (safetensors) beside a tokenizer of fewer tokens than its embedding rows."""
    transformers = pytest.importorskip("transformers")
    from tools.train_tokenizer import train_tokenizer

    hf_dir = tmp_path_factory.mktemp(f"hf_{request.param}")
    corpus = hf_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a tiny corpus, {i * i} squared"}) + "\n"
                              for i in range(50)))
    train_tokenizer(str(corpus), ["text"], 300, str(hf_dir))
    corpus.unlink()
    kind = HF_KINDS[request.param]
    config_cls = transformers.LlamaConfig if request.param == "llama" else transformers.Qwen2Config
    config = config_cls(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        rms_norm_eps=1e-6, **kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF zero-initialises biases; random ones check they are carried over
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(hf_dir)
    return request.param, hf_dir, model


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    kind, hf_dir, _ = hf_model
    save = tmp_path_factory.mktemp(f"ckpt_{kind}") / "ckpt"
    stdout = run_convert("--from-hf", hf_dir, "--save", save, "--seq-length", HF_SEQ)
    return save, printed_flags(stdout)


def gpt_from_flags(flags: list[str]) -> tuple[Config, GPTModel]:
    """The model pretrain_gpt.py builds from the printed flags (vocabulary padded from the tokenizer)."""
    cfg = parse_args(flags)
    build_run_tokenizer(cfg)
    return cfg, GPTModel(cfg.model)


def test_from_hf_logits_equal_hf(hf_model, converted):
    kind, _, hf = hf_model
    save, flags = converted
    assert ("--group-query-attention" in flags) and ("--add-qkv-bias" in flags) == (kind == "qwen2")
    cfg, model = gpt_from_flags(flags)
    assert cfg.model.vocab_size == HF_VOCAB and cfg.model.num_kv_heads == 2
    # The flags rebuild the checkpoint's architecture exactly: load_checkpoint compares every field.
    state = load_checkpoint(str(save), model, load_rng=False, model_config=dataclasses.asdict(cfg.model),
                            add_retriever=False)
    assert state is not None and state.iteration == 0
    tokens = torch.randint(0, HF_VOCAB, (2, HF_SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_to_hf_round_trip_is_bit_identical(hf_model, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf_dir, hf = hf_model
    save, _ = converted
    run_convert("--load", save, "--to-hf", "--output", tmp_path / "hf")
    original, written = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert original.keys() == written.keys()
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(reloaded) is type(hf)
    tokens = torch.randint(0, HF_VOCAB, (2, HF_SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_retro_fitting_the_converted_model_trains_only_retro(converted):
    """--retro-fit-from on a converted checkpoint: the decoder loads and stays bit-identical through
    training steps, the encoder, CCA and gates change (RETRO's own attention: no GQA there)."""
    save, flags = converted
    cfg, gpt = gpt_from_flags(flags)
    load_checkpoint(str(save), gpt, load_rng=False)
    retro = RetroModel(cfg.model, RetroConfig(chunk_length=4, num_neighbors=2, decoder_layers=[2],
                                              encoder_num_layers=1))
    retro.init_weights()
    load_gpt_into_retro(str(save), retro, dataclasses.asdict(cfg.model))
    initial = {name: p.detach().clone() for name, p in retro.named_parameters()}
    optimizer = build_optimizer(retro, TrainingConfig(lr=1e-2))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        tokens = torch.randint(0, HF_VOCAB, (2, HF_SEQ + 1), generator=g)
        neighbors = torch.randint(0, HF_VOCAB, (2, HF_SEQ // 4, 2, 8), generator=g)
        logits = retro(tokens[:, :-1], neighbors)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    decoder = dict(gpt.named_parameters())
    for name, param in retro.named_parameters():
        if name in decoder:
            assert not param.requires_grad and torch.equal(param, decoder[name]), name
        else:
            assert param.requires_grad and not torch.equal(param, initial[name]), name


def test_from_hf_refuses_other_rope_scaling(hf_model, tmp_path):
    _, hf_dir, _ = hf_model
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    (bad / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--from-hf", str(bad), "--save",
                           str(tmp_path / "ckpt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "'yarn'" in proc.stderr

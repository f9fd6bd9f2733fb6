"""One rank of the distributed tests: train a tiny GPT or RETRO under a parallel layout with a
self-contained step (model, AdamW, clipped gradients, cross-entropy) and report what the tests
compare: the global loss of every step and a sample of parameters gathered to full tensors.

Run by launcher.py as ``python tests/distributed/parallel_worker.py SPEC.json OUT.json``; the
single-process reference calls ``run`` in the test process itself (mesh None).
SPEC is a list of runs, executed in order in the same process group:
    {"name", "kind": "gpt"|"retro", "model": ModelConfig overrides, "parallel": ParallelConfig kwargs,
     "bf16", "recompute", "compile", "steps", "save_at", "save_dir", "load_dir", "die_rank", "die_at"}
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from megatron.models.gpt.model import GPTModel
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.parallel.config import ParallelConfig
from megatron.parallel.mesh import build_device_mesh, data_parallel_rank_and_size
from megatron.parallel.parallelize import parallelize_model
from megatron.parallel.tensor_parallel import loss_parallel_context
from megatron.training.initialize import initialize_distributed
from megatron.transformer.config import ModelConfig

GLOBAL_BATCH = 4
VOCAB = 128
SEQ = {"gpt": 32, "retro": 28}
# RETRO: 28 tokens = 3.5 chunks of 8, so under tp2 + sp each rank's 14-token shard ends in the
# middle of a chunk and the last chunk is partial.
RETRO = RetroConfig(chunk_length=8, num_neighbors=2, decoder_layers=[2, 3], encoder_num_layers=2,
                    attention_gate=True, cca_gate_init=0.5)
GATE_BUDGET_WEIGHT = 0.1
SAMPLED_PARAMS = {
    "gpt": ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention_norm.weight",
            "layers.1.mlp.w2.weight", "layers.1.mlp.w3.weight", "norm.weight"],
    "retro": ["tok_embeddings.weight", "layers.1.cca.wq.weight", "layers.2.cca.wo.weight",
              "layers.1.cca_norm.weight", "layers.1.gate.logit_none", "layers.1.gate.logit_full",
              "layers.2.gate.logit_none", "layers.2.gate.logit_full", "layers.2.cca_gate.alpha",
              "layers.1.encoder.layers.0.cross_attention.wk.weight", "layers.1.encoder.layers.1.mlp.w1.weight",
              "layers.1.encoder.layers.0.attention_norm.weight", "layers.1.encoder.norm.weight"],
}


def model_config(kind: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, num_layers=3 if kind == "retro" else 2, hidden_size=32, num_attention_heads=4,
                ffn_hidden_size=64, seq_length=SEQ[kind])
    return ModelConfig(**{**base, **overrides})


def build_model(kind: str, overrides: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_config(kind, **(overrides or {}))
    if kind == "gpt":
        model = GPTModel(cfg)
    elif kind == "retro":
        model = RetroModel(cfg, RETRO)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    model.init_weights()
    return model


def make_batch(kind: str, step: int) -> dict:
    """The global batch of ``step``: the same on every rank and in every layout. RETRO's carries
    neighbours with some masked, including every neighbour of chunk 1 in each sample: the gate
    mean is a mean over the chunks with a real neighbour, so each data-parallel slice must hold
    as many of them per sample as the whole batch for its mean to be the batch's. The first
    neighbour of chunk 0 holds the chunk (as RETRO retrieves), so the gates' overlap is not 0."""
    g = torch.Generator().manual_seed(1000 + step)
    batch = {"tokens": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ[kind] + 1), generator=g)}
    if kind == "retro":
        chunks = -(-SEQ[kind] // RETRO.chunk_length)
        shape = (GLOBAL_BATCH, chunks, RETRO.num_neighbors)
        neighbor_tokens = torch.randint(0, VOCAB, (*shape, RETRO.retrieved_length), generator=g)
        m = RETRO.chunk_length
        neighbor_tokens[:, 0, 0, :m] = batch["tokens"][:, :m]
        batch["neighbor_tokens"] = neighbor_tokens
        mask = torch.rand(shape, generator=g) > 0.25
        mask[:, :, 0] = True
        mask[:, 1] = False
        batch["neighbor_mask"] = mask
    return batch


def local_slice(batch: dict, dp_rank: int, dp_size: int) -> dict:
    return {k: v.chunk(dp_size)[dp_rank] for k, v in batch.items()}


def forward(model, batch):
    if "neighbor_tokens" in batch:
        return model(batch["tokens"][:, :-1], batch["neighbor_tokens"], batch["neighbor_mask"])
    return model(batch["tokens"][:, :-1])


def train_step(model, optimizer, batch, mesh, bf16: bool) -> tuple[float, float]:
    """One optimizer step on this rank's slice; returns (global mean loss, gradient norm)."""
    labels = batch["tokens"][:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and mesh is None)
    with autocast:
        logits = forward(model, batch)
    with loss_parallel_context(model):
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        # Under loss_parallel the per-token losses are a replicated DTensor on the TP mesh.
        loss = (losses.to_local() if isinstance(losses, DTensor) else losses).mean()
        gate_mean = model.gate_mean() if hasattr(model, "gate_mean") else None
        total = loss if gate_mean is None else loss + GATE_BUDGET_WEIGHT * gate_mean
        total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach().clone()
    if mesh is not None and mesh["dp"].size() > 1:
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        loss /= mesh["dp"].size()
    return loss.item(), grad_norm.item()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()


def save_checkpoint(model, optimizer, path: str):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(model, optimizer, path: str):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run(spec: dict) -> dict:
    """Train one layout; rank-independent result (every rank returns the same)."""
    kind = spec.get("kind", "gpt")
    parallel_cfg = ParallelConfig(**spec.get("parallel", {}))
    env = initialize_distributed(parallel_cfg)
    mesh = build_device_mesh(parallel_cfg, env.device.type) if env.is_distributed else None
    model = build_model(kind, spec.get("model"))
    parallelize_model(model, parallel_cfg, mesh, bf16=spec.get("bf16", False),
                      recompute_granularity=spec.get("recompute"), compile=spec.get("compile", False),
                      compile_backend=spec.get("compile_backend", "inductor"))
    # foreach=True on purpose: it fails if TP leaves a mix of DTensor and plain parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    rank = dist.get_rank() if dist.is_initialized() else 0
    first_step = 0
    if spec.get("load_dir"):
        load_checkpoint(model, optimizer, spec["load_dir"])
        first_step = spec["save_at"]
    losses, grad_norms = [], []
    for step in range(first_step, spec.get("steps", 5)):
        if spec.get("die_rank") == rank and spec.get("die_at") == step:
            print(f"rank {rank}: exiting on purpose before step {step}", flush=True)
            os._exit(3)
        loss, grad_norm = train_step(model, optimizer, local_slice(make_batch(kind, step), dp_rank, dp_size),
                                     mesh, spec.get("bf16", False))
        losses.append(loss)
        grad_norms.append(grad_norm)
        if spec.get("save_at") == step + 1 and spec.get("save_dir"):
            save_checkpoint(model, optimizer, spec["save_dir"])
    params = dict(model.named_parameters())
    sampled = {name: full(params[name]).flatten()[:64].tolist() for name in SAMPLED_PARAMS[kind]}
    return {"losses": losses, "grad_norms": grad_norms, "params": sampled}


def main():
    spec_path, out_path = sys.argv[1], sys.argv[2]
    results = {}
    for spec in json.loads(Path(spec_path).read_text()):
        results[spec["name"]] = run(spec)
        dist.barrier()
    if dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        Path(tmp).write_text(json.dumps(results))
        os.replace(tmp, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

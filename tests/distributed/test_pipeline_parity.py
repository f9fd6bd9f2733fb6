"""Pipeline parallelism trains exactly like one process: after 3 AdamW steps of 4 micro-batches,
the losses, gradient norms, a sample of gradients (the retrieval encoder's included: its output
crosses stages and its gradient comes back) and a sample of parameters of pp2 (1F1B, GPipe,
interleaved with 2 virtual stages per rank), pp2 x dp2 (DDP-style and FSDP2) and pp2 x tp2
(plain, with sequence parallel, interleaved) equal the single-process run's, and so do RETRO's
logged gate means; so does training with RETRO's gate budget loss under pp2 (1F1B,
interleaved) and pp2 x fsdp2 (the budget's gradient runs through the schedule's backward).
Through the trainer (pretrain with parallelize_fn): pp2, interleaved, pp2 x fsdp2 match one
process, and DCP checkpoints move between pp2 x tp2 + sp and one process both ways (pp2 <- one
process).

Recompute (full, selective, interleaved) and compile under pp2 change no numbers either, with
RETRO's budget too; pp2 x fsdp2 with the bf16 policy computes in bf16 on fp32 master weights and
trains within bf16's precision of one fp32 process.

RETRO (4 layers, retro layers 2 and 3, the encoder in layer 2) is cut three ways:
- [2, 2]: the encoder in the last layer of stage 0, retro layer 3 the first layer of stage 1, so
  the encoded neighbours and their gradient cross the stage boundary;
- [1, 3]: the encoder's layer is the first of stage 1 (neighbour ids arrive as step keywords);
- interleaved [1, 1, 1, 1]: encoder on rank 1 (stage 1), its output used on rank 0 (stage 2).
The token embedding is shared by stage 0, the encoder's stage and the tied head.

This file is also the worker: ``python test_pipeline_parity.py SPEC.json OUT.json`` under launcher.py.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import trainer_worker
from launcher import launch

from megatron.models.gpt.model import GPTModel
from megatron.models.loss import lm_loss, next_token_loss
from megatron.models.retro.config import RetroConfig
from megatron.models.retro.model import RetroModel
from megatron.parallel.config import ParallelConfig
from megatron.transformer.config import ModelConfig

VOCAB, SEQ, GLOBAL_BATCH, MICRO = 128, 32, 8, 4
STEPS = 3
RETRO = RetroConfig(chunk_length=8, num_neighbors=2, decoder_layers=[2, 3], encoder_num_layers=2,
                    attention_gate=True, cca_gate_init=0.5)
SAMPLED = {
    "gpt": ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.mlp.w2.weight",
            "layers.2.attention.wo.weight", "layers.3.mlp.w1.weight", "norm.weight"],
    "retro": ["tok_embeddings.weight", "layers.0.attention.wq.weight",
              "layers.1.encoder.layers.0.cross_attention.wk.weight", "layers.1.encoder.layers.1.mlp.w1.weight",
              "layers.1.encoder.norm.weight", "layers.1.cca.wq.weight", "layers.1.cca_gate.alpha",
              "layers.1.gate.logit_none", "layers.1.gate.logit_full", "layers.2.gate.logit_full",
              "layers.2.cca.wk.weight", "layers.2.cca.wo.weight", "layers.3.mlp.w2.weight", "norm.weight"],
}
RTOL, ATOL = 2e-5, 2e-6


def build_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=4, hidden_size=32, num_attention_heads=4,
                      ffn_hidden_size=64, seq_length=SEQ)
    model = RetroModel(cfg, RETRO) if kind == "retro" else GPTModel(cfg)
    model.init_weights()
    return model


def make_batch(kind: str, step: int) -> dict:
    g = torch.Generator().manual_seed(500 + step)
    batch = {"text": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)}
    if kind == "retro":
        shape = (GLOBAL_BATCH, SEQ // RETRO.chunk_length, RETRO.num_neighbors)
        neighbor_tokens = torch.randint(0, VOCAB, (*shape, RETRO.retrieved_length), generator=g)
        # Chunk 1's second neighbour holds the chunk, as RETRO retrieves: the gates' overlap is not 0.
        m = RETRO.chunk_length
        neighbor_tokens[:, 1, 1, :m] = batch["text"][:, m:2 * m]
        batch["neighbor_tokens"] = neighbor_tokens
        mask = torch.rand(shape, generator=g) > 0.25
        mask[0, 1] = False
        batch["neighbor_mask"] = mask
    return batch


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def sample(t: torch.Tensor) -> list[float]:
    return t.detach().float().flatten()[:48].tolist()


def reference(kind: str, budget: float = 0.0) -> dict:
    """One process: MICRO micro-batches accumulated with loss / MICRO, clip 1.0, AdamW; with a
    budget, RETRO's loss + budget x mean gate, as megatron/training/retro_step.py's forward step.
    RETRO's gate means are averaged over the micro-batches, as the trainer logs them."""
    model = build_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms, gate_means = [], [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total = gate_total = 0.0
        for micro in range(MICRO):
            mb = {k: v.chunk(MICRO)[micro] for k, v in make_batch(kind, step).items()}
            text = mb["text"]
            extra = (mb["neighbor_tokens"], mb["neighbor_mask"]) if kind == "retro" else ()
            loss = lm_loss(model(text[:, :-1], *extra), text[:, 1:]) / MICRO
            total += loss.item()
            if kind == "retro":
                gate_total += model.gate_mean().item() / MICRO
                if budget:
                    loss = loss + budget * model.gate_mean() / MICRO
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        losses.append(total)
        gate_means.append(gate_total)
        params = dict(model.named_parameters())
        grads = {n: sample(params[n].grad) for n in SAMPLED[kind]}
        opt.step()
    params = dict(model.named_parameters())
    return {"losses": losses, "grad_norms": norms, "grads": grads, "gate_means": gate_means if kind == "retro" else [],
            "params": {n: sample(params[n]) for n in SAMPLED[kind]}}


def run_pipelined(spec: dict) -> dict:
    """One layout on the already-launched process group; every rank returns the same result."""
    from megatron.parallel.mesh import build_device_mesh, data_parallel_rank_and_size
    from megatron.parallel.pipeline import PipelinedModel

    kind = spec["kind"]
    cfg = ParallelConfig(pipeline_model_parallel_size=spec.get("pp", 2), tensor_model_parallel_size=spec.get("tp", 1),
                         sequence_parallel=spec.get("sp", False), data_parallel_type=spec.get("dp_type", "ddp"))
    mesh = build_device_mesh(cfg, "cpu")
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    pipe = PipelinedModel(build_model(kind), mesh, num_microbatches=MICRO // dp_size,
                          schedule=spec.get("schedule", "1F1B"), virtual_stages=spec.get("virtual", 1),
                          split=spec.get("split"), sequence_parallel=cfg.sequence_parallel,
                          fsdp=cfg.data_parallel_type == "fsdp",
                          bf16=spec.get("bf16", False), recompute_granularity=spec.get("recompute"),
                          compile=spec.get("compile", False), compile_backend=spec.get("compile_backend", "inductor"))
    compute_dtypes = set()  # of the weights the blocks' matmuls read: FSDP's mixed-precision policy casts them
    for layer in pipe.model.layers.values():
        layer.attention.wq.register_forward_hook(lambda m, args, out: compute_dtypes.add(str(m.weight.dtype)))
    opt = torch.optim.AdamW(pipe.model.parameters(), lr=1e-2, weight_decay=0.1)
    budget = spec.get("budget", 0.0)
    budget_loss_fn = (lambda gate_mean: budget * gate_mean) if budget else None  # as retro_step's
    losses, norms, gate_means = [], [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        batch = {k: v.chunk(dp_size)[dp_rank] for k, v in make_batch(kind, step).items()}
        metrics = pipe.train_step(batch, next_token_loss, budget_loss_fn)
        loss = metrics["lm loss"]
        if kind == "retro":
            gate_mean = metrics["gate mean"]
            if dp_size > 1:
                dist.all_reduce(gate_mean, group=mesh["dp"].get_group())
                gate_mean /= dp_size
            gate_means.append(gate_mean.item())
        if dp_size > 1:
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            loss /= dp_size
        norms.append(pipe.clip_grad_norm_(1.0))
        losses.append(loss.item())
        params = dict(pipe.model.named_parameters())
        grads = {n: sample(full(params[n].grad)) for n in SAMPLED[kind] if n in params}
        opt.step()
    params = dict(pipe.model.named_parameters())
    mine = {"grads": grads, "params": {n: sample(full(params[n])) for n in SAMPLED[kind] if n in params}}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged = {"losses": losses, "grad_norms": norms, "gate_means": gate_means, "split": pipe.split,
              "grads": {}, "params": {},
              "sharded": any(isinstance(p, DTensor) for p in pipe.model.parameters()),
              "compute_dtypes": sorted(compute_dtypes), "param_dtypes": sorted({str(p.dtype) for p in pipe.model.parameters()})}
    for part in gathered:
        for key in ("grads", "params"):
            merged[key].update(part[key])
    return merged


def run_trainer(spec: dict) -> dict:
    """pretrain() with megatron.parallel's parallelize_fn on trainer_worker's setup (a 2-layer
    GPT, micro-batch 1, global batch 4: 4 / dp micro-batches per iteration), logging every
    iteration so that every iteration's loss is compared."""
    from megatron.models.loss import LM_LOSS
    from megatron.parallel.parallelize import parallelize_fn
    from megatron.training.trainer import pretrain

    cfg = trainer_worker.config(spec)
    cfg.logging.log_interval = 1
    summary = pretrain(cfg, lambda c: GPTModel(c.model), trainer_worker.forward_step,
                       lambda c, counts: (trainer_worker.SyntheticTokens(counts[0]), None, None),
                       loss_fn=next_token_loss, parallelize_fn=parallelize_fn)
    return {"losses": [m[LM_LOSS] for _, m in summary["train_history"]],
            "consumed": summary["consumed_train_samples"]}


def main():
    from megatron.training.initialize import initialize_distributed

    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    if "trainer" in spec:
        results = run_trainer(spec["trainer"])
    else:
        initialize_distributed(ParallelConfig(distributed_backend="gloo"))
        results = {}
        for run in spec:
            results[run["name"]] = run_pipelined(run)
            dist.barrier()
    if dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        Path(tmp).write_text(json.dumps(results))
        os.replace(tmp, out_path)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- tests

TWO_PROC = {
    "gpt": {"pp2_1f1b": {}, "pp2_gpipe": {"schedule": "gpipe"},
            "pp2_interleaved": {"schedule": "interleaved-1F1B", "virtual": 2}},
    "retro": {"pp2_encoder_output_crosses": {"split": [2, 2]},
              "pp2_encoder_first_in_stage": {"split": [1, 3], "schedule": "gpipe"},
              "pp2_balanced": {},
              "pp2_interleaved": {"schedule": "interleaved-1F1B", "virtual": 2},
              "pp2_budget_loss": {"split": [2, 2], "budget": 0.5},
              "pp2_interleaved_budget_loss": {"schedule": "interleaved-1F1B", "virtual": 2, "budget": 0.5}},
}
FOUR_PROC = {"pp2_dp2": {}, "pp2_fsdp2": {"dp_type": "fsdp"},
             "pp2_fsdp2_budget_loss": {"dp_type": "fsdp", "budget": 0.5, "split": [2, 2]},
             "pp2_tp2": {"tp": 2}, "pp2_tp2_sp": {"tp": 2, "sp": True, "split": [2, 2]},
             "pp2_tp2_interleaved": {"tp": 2, "schedule": "interleaved-1F1B", "virtual": 2}}


def launched(tmp_path: Path, specs: list[dict], world_size: int, timeout: float) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps(specs))
    launch(Path(__file__), [str(tmp_path / "spec.json"), str(tmp_path / "out.json")], world_size, timeout, tmp_path)
    return json.loads((tmp_path / "out.json").read_text())


def assert_same(got: dict, want: dict, what: str):
    close = lambda a, b, m, k=1: torch.testing.assert_close(  # noqa: E731
        torch.tensor(a), torch.tensor(b), rtol=RTOL * k, atol=ATOL * k, msg=lambda e: f"{what}: {m}\n{e}")
    close(got["losses"], want["losses"], "losses differ")
    close(got["gate_means"], want["gate_means"], "gate means differ")
    close(got["grad_norms"], want["grad_norms"], "gradient norms differ", 10)
    for key in ("grads", "params"):
        assert set(got[key]) == set(want[key]), f"{what}: {key} sampled {sorted(got[key])}"
        for name, values in want[key].items():
            close(got[key][name], values, f"{key[:-1]} {name} differs", 10)


@pytest.fixture(scope="module", params=["gpt", "retro"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def single(kind):
    return reference(kind)


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, kind):
    specs = [{"name": name, "kind": kind, **spec} for name, spec in TWO_PROC[kind].items()]
    return launched(tmp_path_factory.mktemp(f"pp2_{kind}"), specs, 2, timeout=240)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_two_process_layouts_match_one_process(two_proc, single, kind):
    for name, spec in TWO_PROC[kind].items():
        want = reference(kind, spec["budget"]) if "budget" in spec else single
        assert_same(two_proc[name], want, f"{kind} {name}")


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_times_data_parallel_matches_one_process(tmp_path, single, kind):
    # The budget loss prices RETRO's gates: a GPT has none.
    layouts = {name: spec for name, spec in FOUR_PROC.items() if kind == "retro" or "budget" not in spec}
    specs = [{"name": name, "kind": kind, **spec} for name, spec in layouts.items()]
    got = launched(tmp_path, specs, 4, timeout=240)
    for name, spec in layouts.items():
        want = reference(kind, spec["budget"]) if "budget" in spec else single
        assert_same(got[name], want, f"{kind} {name}")
    assert got["pp2_fsdp2"]["sharded"] and not got["pp2_dp2"]["sharded"]


# Parallelized as parallelize_model does any model (TP, recompute, compile, then FSDP): recompute
# and compile change no numbers under pp2 either. Compile on aot_eager, as the data-parallel parity
# tests, for the multi-process runs without inductor's C++ compile time.
SWITCHES = {"pp2_recompute_full": {"recompute": "full"},
            "pp2_interleaved_recompute_selective": {"schedule": "interleaved-1F1B", "virtual": 2,
                                                    "recompute": "selective"},
            "pp2_compile": {"compile": True, "compile_backend": "aot_eager"},
            "pp2_compile_recompute_budget_loss": {"compile": True, "compile_backend": "aot_eager",
                                                  "recompute": "selective", "split": [2, 2], "budget": 0.5}}


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_with_recompute_and_compile_matches_one_process(tmp_path, single, kind):
    layouts = {name: spec for name, spec in SWITCHES.items() if kind == "retro" or "budget" not in spec}
    got = launched(tmp_path, [{"name": name, "kind": kind, **spec} for name, spec in layouts.items()], 2,
                   timeout=300)
    for name, spec in layouts.items():
        assert_same(got[name], reference(kind, spec["budget"]) if "budget" in spec else single, f"{kind} {name}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt"], indirect=True)
def test_pipeline_fsdp_bf16_policy_trains_close_to_fp32(tmp_path, single, kind):
    """pp2 x fsdp2 with data_parallel.py's policy: fp32 master weights, bf16 matmuls, losses within
    bf16's precision of one fp32 process."""
    got = launched(tmp_path, [{"name": "pp2_fsdp2_bf16", "kind": kind, "dp_type": "fsdp", "bf16": True}], 4,
                   timeout=240)["pp2_fsdp2_bf16"]
    assert got["sharded"] and got["param_dtypes"] == ["torch.float32"]
    assert got["compute_dtypes"] == ["torch.bfloat16"], "the bf16 policy did not cast the blocks' weights"
    assert all(math.isfinite(loss) for loss in got["losses"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=2e-2, atol=0)
    assert got["losses"] != single["losses"]


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- through the trainer

def trainer_run(tmp_path: Path, spec: dict, world_size: int) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps({"trainer": spec}))
    launch(Path(__file__), [str(tmp_path / "spec.json"), str(tmp_path / "out.json")], world_size, 180, tmp_path)
    return json.loads((tmp_path / "out.json").read_text())


@pytest.fixture(scope="module")
def trainer_single():
    result = run_trainer({})
    assert len(result["losses"]) == 5
    return result


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("flags,world_size", [
    ({"pipeline_model_parallel_size": 2}, 2),
    ({"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}, 2),
    ({"pipeline_model_parallel_size": 2, "pipeline_schedule": "gpipe", "data_parallel_type": "fsdp"}, 4),
], ids=["pp2_1f1b", "pp2_interleaved", "pp2_fsdp2_gpipe"])
def test_trainer_pipelined_matches_one_process(tmp_path, trainer_single, flags, world_size):
    got = trainer_run(tmp_path, {"parallel": flags}, world_size)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(trainer_single["losses"]),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_checkpoint_from_pp2_tp2_resumes_on_one_process(tmp_path, trainer_single):
    """DCP resharding: each pipeline rank saves its layers (and its copy of the tied embedding,
    vocabulary-sharded over tp) under the full model's names; one process loads them all."""
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = trainer_run(tmp_path, {"parallel": {"pipeline_model_parallel_size": 2,
                                                        "tensor_model_parallel_size": 2, "sequence_parallel": True},
                                           "save": ckpt, "save_interval": 3}, 4)
    assert len(uninterrupted["losses"]) == 5
    torch.testing.assert_close(torch.tensor(uninterrupted["losses"]), torch.tensor(trainer_single["losses"]),
                               rtol=RTOL, atol=ATOL)
    resumed = run_trainer({"load": ckpt, "ckpt_step": 3})
    assert resumed["consumed"] == 20 and len(resumed["losses"]) == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(uninterrupted["losses"][3:]),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_checkpoint_from_one_process_resumes_under_pp2(tmp_path, trainer_single):
    ckpt = str(tmp_path / "ckpt")
    run_trainer({"save": ckpt, "save_interval": 3})
    resumed = trainer_run(tmp_path, {"parallel": {"pipeline_model_parallel_size": 2}, "load": ckpt,
                                     "ckpt_step": 3}, 2)
    assert resumed["consumed"] == 20 and len(resumed["losses"]) == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(trainer_single["losses"][3:]),
                               rtol=RTOL, atol=ATOL)

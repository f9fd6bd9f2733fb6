"""Parallel layouts train exactly like one process: after 5 AdamW steps on the same global
batches, losses, gradient norms and sampled parameters of tp2, tp2+sp, fsdp2, ddp2 and
dp2 x tp2 match the single-process run within fp32 tolerance, for GPT and for RETRO (CCA,
encoder and gate included); recompute, compile and bf16 switches too.

Also: DCP checkpoints reshard (dp2 x tp2 -> 1 process and 1 process -> dp2 x tp2 continue with
the uninterrupted run's losses), and a rank that dies makes the others fail, not hang.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import parallel_worker
from launcher import REPO_ROOT, LaunchError, free_port, launch, rank_env, run_ranks

WORKER = Path(parallel_worker.__file__)
RTOL, ATOL = 2e-5, 2e-6  # fp32 with different reduction orders
SAVE_AT = 3

pytestmark = pytest.mark.distributed

TWO_PROC_LAYOUTS = {
    "tp2": dict(parallel=dict(tensor_model_parallel_size=2)),
    "tp2_sp": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "fsdp2": dict(parallel=dict(data_parallel_type="fsdp")),
    "ddp2": dict(parallel=dict(data_parallel_type="ddp")),
    "tp2_sp_selective": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True),
                             recompute="selective"),
    "fsdp2_full_recompute": dict(parallel=dict(data_parallel_type="fsdp"), recompute="full"),
    # aot_eager traces the blocks with dynamo/AOTAutograd (DTensor and FSDP hooks included)
    # without inductor's C++ compile time; inductor itself is checked on one process.
    "tp2_sp_compile": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True),
                           compile=True, compile_backend="aot_eager"),
    "fsdp2_compile": dict(parallel=dict(data_parallel_type="fsdp"), compile=True, compile_backend="aot_eager"),
}
FOUR_PROC_LAYOUTS = {
    "dp2_tp2": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                  data_parallel_type="fsdp")),
    "hsdp2x2": dict(parallel=dict(data_parallel_type="fsdp", data_parallel_sharding_degree=2)),
}


def run_launch(tmp_path: Path, specs: list[dict], world_size: int, timeout: float) -> dict:
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(specs))
    launch(WORKER, [str(spec_path), str(out_path)], world_size, timeout, tmp_path)
    return json.loads(out_path.read_text())


def assert_same_training(got: dict, want: dict, what: str, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: losses differ\n{m}")
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(want["grad_norms"]),
                               rtol=rtol * 10, atol=atol * 10, msg=lambda m: f"{what}: gradient norms differ\n{m}")
    for name, values in want["params"].items():
        torch.testing.assert_close(torch.tensor(got["params"][name]), torch.tensor(values), rtol=rtol * 10,
                                   atol=atol * 10, msg=lambda m: f"{what}: parameter {name} differs\n{m}")


@pytest.fixture(scope="module", params=["gpt", "retro"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kind):
    """Single-process run (this process, no process group); also saves a checkpoint at SAVE_AT."""
    ckpt = tmp_path_factory.mktemp(f"single_{kind}") / "ckpt"
    return parallel_worker.run({"kind": kind, "steps": 5, "save_at": SAVE_AT, "save_dir": str(ckpt)}), ckpt


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, kind):
    specs = [{"name": name, "kind": kind, "steps": 5, **layout} for name, layout in TWO_PROC_LAYOUTS.items()]
    if kind == "gpt":  # the policy is the model's business only through FSDP; bf16 is slow on CPU
        specs.append({"name": "fsdp2_bf16", "kind": kind, "steps": 5, "bf16": True,
                      "parallel": dict(data_parallel_type="fsdp")})
    return run_launch(tmp_path_factory.mktemp(f"two_{kind}"), specs, 2, timeout=240)


@pytest.fixture(scope="module")
def four_proc(tmp_path_factory, reference, kind):
    _, single_ckpt = reference
    tmp = tmp_path_factory.mktemp(f"four_{kind}")
    dp2_tp2 = FOUR_PROC_LAYOUTS["dp2_tp2"]
    specs = [{"name": name, "kind": kind, "steps": 5, **layout} for name, layout in FOUR_PROC_LAYOUTS.items()]
    specs[0].update(save_at=SAVE_AT, save_dir=str(tmp / "ckpt"))
    specs.append({"name": "dp2_tp2_from_single", "kind": kind, "steps": 5, "save_at": SAVE_AT,
                  "load_dir": str(single_ckpt), **dp2_tp2})
    return run_launch(tmp, specs, 4, timeout=240), tmp / "ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO_PROC_LAYOUTS))
def test_two_process_layout_matches_single_process(layout, two_proc, reference):
    assert_same_training(two_proc[layout], reference[0], layout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt"], indirect=True)
def test_fsdp_bf16_policy_trains_close_to_fp32(two_proc, reference):
    got, want = two_proc["fsdp2_bf16"]["losses"], reference[0]["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=0)
    assert got != want, "the bf16 policy changed nothing: parameters were not cast"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(FOUR_PROC_LAYOUTS))
def test_four_process_layout_matches_single_process(layout, four_proc, reference):
    assert_same_training(four_proc[0][layout], reference[0], layout)


@pytest.mark.slow
def test_checkpoint_from_dp2_tp2_continues_on_one_process(four_proc, kind):
    results, ckpt = four_proc
    uninterrupted = results["dp2_tp2"]
    resumed = parallel_worker.run({"kind": kind, "steps": 5, "save_at": SAVE_AT, "load_dir": str(ckpt)})
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(uninterrupted["losses"][SAVE_AT:]),
                               rtol=RTOL, atol=ATOL)
    for name, values in uninterrupted["params"].items():
        torch.testing.assert_close(torch.tensor(resumed["params"][name]), torch.tensor(values),
                                   rtol=RTOL * 10, atol=ATOL * 10)


@pytest.mark.slow
def test_checkpoint_from_one_process_continues_on_dp2_tp2(four_proc, reference):
    resumed = four_proc[0]["dp2_tp2_from_single"]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference[0]["losses"][SAVE_AT:]),
                               rtol=RTOL, atol=ATOL)

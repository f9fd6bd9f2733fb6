"""The trainer (pretrain) with megatron.parallel's parallelize_fn: tp2+sp and dp2 x tp2 train
with the single-process losses (gradient accumulation included), and a trainer checkpoint
written under dp2 x tp2 resumes on one process with the uninterrupted run's losses."""

import json
from pathlib import Path

import pytest
import torch

import trainer_worker
from launcher import launch

WORKER = Path(trainer_worker.__file__)
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
DP2_TP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True, "data_parallel_type": "fsdp"}


def launched(tmp_path: Path, spec: dict, world_size: int) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(WORKER, [str(tmp_path / "spec.json"), str(tmp_path / "out.json")], world_size, 120, tmp_path)
    return json.loads((tmp_path / "out.json").read_text())


def assert_losses(got, want):
    assert len(got) == len(want) > 0  # one loss per iteration: an empty history would compare equal
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def single():
    return trainer_worker.run({})


def test_trainer_tp2_sp_matches_one_process(tmp_path, single):
    got = launched(tmp_path, {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}}, 2)
    assert_losses(got["losses"], single["losses"])
    assert_losses([got["validation_loss"]], [single["validation_loss"]])
    # The loss ran on vocabulary-sharded logits (loss_parallel), in training and in validation.
    assert single["logit_types"] == ["Tensor"]
    assert got["logit_types"] == ["DTensor[Shard(dim=2)]"]


def test_trainer_checkpoint_from_dp2_tp2_resumes_on_one_process(tmp_path, single):
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = launched(tmp_path, {"parallel": DP2_TP2, "recompute": "full", "save": ckpt,
                                        "save_interval": 3}, 4)
    assert_losses(uninterrupted["losses"], single["losses"])
    # The run also saved its final iteration (5); resume from 3.
    resumed = trainer_worker.run({"load": ckpt, "ckpt_step": 3})
    assert resumed["consumed"] == 20
    assert_losses(resumed["losses"], uninterrupted["losses"][3:])

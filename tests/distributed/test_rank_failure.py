"""A rank that dies mid-training makes the job fail promptly, with the dead rank named, instead
of hanging until the 10-minute collective timeout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import parallel_worker
from launcher import REPO_ROOT, LaunchError, launch, rank_env

WORKER = Path(parallel_worker.__file__)
pytestmark = pytest.mark.distributed
DIES = [{"name": "dies", "kind": "gpt", "steps": 5, "parallel": {"data_parallel_type": "fsdp"},
         "die_rank": 1, "die_at": 2}]


def write_spec(tmp_path: Path) -> list[str]:
    (tmp_path / "spec.json").write_text(json.dumps(DIES))
    return [str(tmp_path / "spec.json"), str(tmp_path / "out.json")]


def test_survivor_fails_by_itself_and_the_dead_rank_is_named(tmp_path):
    with pytest.raises(LaunchError, match=r"rank 1 failed first \(exit code 3") as failure:
        launch(WORKER, write_spec(tmp_path), 2, timeout=90, log_dir=tmp_path)
    survivor, dead = failure.value.results
    # Not killed at the deadline: it raised on its own, soon after its peer vanished.
    assert survivor.returncode not in (0, None), survivor.log[-2000:]
    assert survivor.exit_time - dead.exit_time < 30
    assert re.search(r"Connection (closed|reset) by peer", survivor.log), survivor.log[-2000:]


def test_torchrun_reports_the_dead_rank_as_root_cause(tmp_path):
    """The launcher every recipe uses (torchrun, also under SLURM) names the rank that died."""
    env = rank_env(0, 1, 0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "0", str(WORKER), *write_spec(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*3", output, re.S), output[-3000:]

"""The SLURM recipe, rendered without SLURM: examples/retro/pretrain_retro.sbatch runs under
stand-ins for srun (one task per node of a fake 2-node allocation), scontrol and torchrun that
record the command each node would start. The test checks the torchrun rendezvous (2 nodes x 8
ranks, one endpoint on the first host, the job id) and the mesh the flags build for 16 ranks:
pp 1 x dp_replicate 2 x dp_shard 4 x tp 2, with tensor-parallel and shard groups inside a node."""

import os
import subprocess
from pathlib import Path

import numpy as np
from torch.distributed.run import get_args_parser

from megatron.parallel.mesh import MeshShape, mesh_shape
from megatron.training.arguments import parse_args
from megatron.training.retro_config import add_retro_args

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "retro" / "pretrain_retro.sbatch"
GPUS_PER_NODE = 8

STUBS = {
    "scontrol": """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stub: unexpected $*" >&2; exit 2; }
echo gpu-node-001; echo gpu-node-002
""",
    # srun: skip its own options, then run the command once per node with that node's variables.
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" || exit $?
done
""",
    "torchrun": """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD_DIR/node$SLURM_NODEID"
""",
}


def render(tmp_path: Path) -> dict[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_PER_NODE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RECORD_DIR=str(tmp_path), SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[001-002]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE=str(GPUS_PER_NODE))
    subprocess.run(["bash", str(SBATCH)], env=env, check=True, timeout=60, capture_output=True)
    return {node: (tmp_path / f"node{node}").read_text().rstrip("\0").split("\0") for node in (0, 1)}


def test_sbatch_renders_a_two_node_rendezvous_and_the_expected_mesh(tmp_path):
    commands = render(tmp_path)
    assert commands[0] == commands[1], "both nodes must start the same torchrun command"
    launch = get_args_parser().parse_args(commands[0])
    assert (launch.nnodes, launch.nproc_per_node) == ("2", str(GPUS_PER_NODE))
    assert launch.rdzv_backend == "c10d" and launch.rdzv_endpoint == "gpu-node-001:29500"
    assert launch.rdzv_id == "4242" and launch.max_restarts == 0
    assert launch.training_script == "pretrain_retro.py"

    # The training flags, parsed and validated as pretrain_retro.py parses them (its work-dir
    # checks aside: the work dir does not exist here).
    cfg = parse_args(launch.training_script_args, extra_args_provider=add_retro_args)
    world = int(launch.nnodes) * int(launch.nproc_per_node)
    shape = mesh_shape(cfg.parallel, world)
    assert shape == MeshShape(pp=1, dp_replicate=2, dp_shard=4, tp=2)
    assert cfg.parallel.sequence_parallel and cfg.training.bf16

    # Rank r runs on node r // 8 (torchrun numbers a node's ranks contiguously).
    node = np.arange(world).reshape(shape.as_tuple()) // GPUS_PER_NODE
    assert (node == node[..., :1]).all(), "a tensor-parallel group crosses nodes"
    assert (node == node[:, :, :1, :]).all(), "an FSDP shard group crosses nodes"
    assert (node[:, 0] != node[:, 1]).all(), "the two replicas should live on different nodes"

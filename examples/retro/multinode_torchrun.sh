#!/usr/bin/env bash
# One torchrun agent per node of a SLURM allocation; run it under srun with one task per node:
#
#   srun --ntasks-per-node=1 bash examples/retro/multinode_torchrun.sh pretrain_retro.py ARGS...
#
# The rendezvous comes from SLURM's variables: the first host of the allocation serves the c10d
# rendezvous store, every node starts GPUS_PER_NODE ranks, and the job id names the rendezvous
# so that two jobs on the same hosts never join each other. Ranks of one node are contiguous
# (rank = node * GPUS_PER_NODE + local rank), which is what keeps tensor-parallel groups and
# HSDP shard groups inside a node (see megatron/parallel/mesh.py).
# Overridable: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), MASTER_ADDR, MASTER_PORT.
set -euo pipefail

: "${SLURM_JOB_NODELIST:?run this under srun inside a SLURM allocation}"
NNODES=${SLURM_NNODES:?SLURM_NNODES is not set}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# sed, not head: head would exit after one line and, under pipefail, scontrol's SIGPIPE would
# fail the script on a multi-node allocation.
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
MASTER_PORT=${MASTER_PORT:-29500}

# One intra-op thread per rank unless asked otherwise: GPU ranks need few, and N ranks each
# spawning all cores' worth of threads only fight.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# --max-restarts 0: a failed rank ends the job; torchrun's summary names it ("Root Cause").
exec torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${SLURM_JOB_ID:-retro}" \
    --max-restarts 0 \
    "$@"

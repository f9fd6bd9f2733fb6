"""Process setup: join the process group the launcher describes, pick the device, seed RNGs.

Rank, world size and local rank always come from the environment: torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); under `srun` without torchrun the SLURM
variables are translated to those names. A plain `python pretrain_gpt.py` has none of them
and runs as one process without any process group.
"""

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.parallel.config import ParallelConfig
from megatron.parallel.layout import DistEnv


def _launcher_env(environ) -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun's variables, else from SLURM's, else None."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return {"RANK": int(environ.get("RANK", "0")), "WORLD_SIZE": int(environ.get("WORLD_SIZE", "1")),
                "LOCAL_RANK": int(environ.get("LOCAL_RANK", "0"))}
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return {"RANK": int(environ["SLURM_PROCID"]), "WORLD_SIZE": int(environ["SLURM_NTASKS"]),
                "LOCAL_RANK": int(environ.get("SLURM_LOCALID", "0"))}
    return None


def default_backend(cfg: ParallelConfig) -> str:
    if cfg.distributed_backend is not None:
        return cfg.distributed_backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_distributed(cfg: ParallelConfig, environ=None) -> DistEnv:
    """Join the process group when launched by torchrun/srun; a lone process gets none.

    Under srun the SLURM variables are copied to RANK / WORLD_SIZE / LOCAL_RANK in `environ`
    (os.environ by default) so that everything downstream reads one set of names.
    """
    environ = os.environ if environ is None else environ
    launcher = _launcher_env(environ)
    if launcher is None and not dist.is_initialized():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend=None)

    if launcher is None:  # someone (a test, a notebook) already initialised the group
        launcher = {"RANK": dist.get_rank(), "WORLD_SIZE": dist.get_world_size(),
                    "LOCAL_RANK": int(environ.get("LOCAL_RANK", "0"))}
    rank, world_size, local_rank = launcher["RANK"], launcher["WORLD_SIZE"], launcher["LOCAL_RANK"]
    backend = default_backend(cfg)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("--distributed-backend nccl needs CUDA, which this process does not see")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                raise RuntimeError(f"rank {rank} of {world_size}: {name} is not set; launch with torchrun "
                                   f"or export MASTER_ADDR/MASTER_PORT in the SLURM script")
        # env:// reads these names; under torchrun it also joins the agent's store instead of
        # opening a second one on MASTER_PORT.
        for name, value in launcher.items():
            environ[name] = str(value)
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.distributed_timeout_minutes))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   backend=dist.get_backend())


def pipeline_rank(env: DistEnv, pipeline_parallel_size: int) -> int:
    """This rank's pipeline stage: pipeline is the slowest-varying mesh dimension (Megatron's order)."""
    return env.rank // max(1, env.world_size // pipeline_parallel_size)


def set_random_seed(seed: int, pipeline_rank: int = 0):
    """Seed python, numpy and torch (all devices).

    Megatron's rule: every rank of a pipeline stage shares the seed (tensor-parallel ranks must
    draw identical dropout masks in replicated regions), stages differ by 100 each.
    """
    seed = seed + 100 * pipeline_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device

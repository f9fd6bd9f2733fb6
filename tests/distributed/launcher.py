"""Start N real processes of a worker script on gloo/127.0.0.1 and wait for them under a hard deadline.

Each rank gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a
free port) and one intra-op thread (the test machine has two cores for everyone). A rank that
fails does not make the launcher kill the others: they must fail by themselves, which is what
the dead-rank test checks; only the deadline kills.
"""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the deadline
    exit_time: float | None  # seconds after start
    log: str


class LaunchError(RuntimeError):
    def __init__(self, message: str, results: list[RankResult]):
        super().__init__(message)
        self.results = results


def rank_env(rank: int, world_size: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return env


def tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_ranks(script: Path, args: list[str], world_size: int, timeout: float, log_dir: Path) -> list[RankResult]:
    """Run all ranks to completion; return each rank's exit code, exit time and log."""
    port = free_port()
    start = time.monotonic()
    procs, logs = [], []
    for rank in range(world_size):
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=REPO_ROOT,
                                      env=rank_env(rank, world_size, port), stdout=log, stderr=subprocess.STDOUT))
    exit_times: list[float | None] = [None] * world_size
    while any(t is None for t in exit_times) and time.monotonic() - start < timeout:
        for rank, p in enumerate(procs):
            if exit_times[rank] is None and p.poll() is not None:
                exit_times[rank] = time.monotonic() - start
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    return [
        RankResult(rank, procs[rank].returncode if exit_times[rank] is not None else None,
                   exit_times[rank], (log_dir / f"rank{rank}.log").read_text())
        for rank in range(world_size)
    ]


def lost_port_race(results: list[RankResult]) -> bool:
    """free_port() releases the port before rank 0 binds it; another process may take it first."""
    return any("address already in use" in r.log.lower() for r in results)


def launch(script: Path, args: list[str], world_size: int, timeout: float, log_dir: Path) -> list[RankResult]:
    """Like run_ranks, but raise LaunchError naming the rank that failed first, or those that hung."""
    results = run_ranks(script, args, world_size, timeout, log_dir)
    if lost_port_race(results):
        results = run_ranks(script, args, world_size, timeout, log_dir)
    hung = [r.rank for r in results if r.returncode is None]
    failed = sorted((r for r in results if r.returncode not in (0, None)), key=lambda r: r.exit_time)
    if failed:
        first = failed[0]
        raise LaunchError(
            f"rank {first.rank} failed first (exit code {first.returncode} after {first.exit_time:.1f}s); "
            f"failed ranks {[r.rank for r in failed]}, killed at the {timeout:.0f}s deadline {hung}\n"
            f"--- rank {first.rank} log ---\n{tail(first.log)}", results)
    if hung:
        raise LaunchError(
            f"ranks {hung} did not finish within {timeout:.0f}s\n--- rank {hung[0]} log ---\n"
            f"{tail(results[hung[0]].log)}", results)
    return results

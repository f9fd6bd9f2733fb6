"""keep_freed_host_memory: a block freed by one training step is reused by the next ones without
the kernel faulting its pages in again (glibc; the CI runs on Linux)."""

import json
import subprocess
import sys

# Page faults of each of 20 allocations of a 64 MiB tensor, each freed at once (a step's
# activations, step after step), before and after the setting, in a fresh process (the setting is
# process-wide). After it the first few still grow the heap: a freed block lies below the tensors'
# small bookkeeping allocations, a few bytes short of the next aligned request, until neighbouring
# freed blocks coalesce.
PROBE = """
import resource
import torch
from megatron.training.host_memory import keep_freed_host_memory

def faults_per_allocation():
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2 ** 20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

print(faults_per_allocation(), keep_freed_host_memory(), faults_per_allocation(), sep=";")
"""


def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    returned, applied, kept = out.stdout.strip().split(";")
    assert applied == "True"
    # glibc's default: each one mmap'd anew and its 16,384 pages of 4 KiB faulted in.
    assert min(json.loads(returned)[-5:]) > 8000
    assert sum(json.loads(kept)[-5:]) < 100

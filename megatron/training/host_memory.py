"""Keep freed host memory inside the process, so that training on a CPU reuses it step after step.

glibc's malloc serves a block above its mmap threshold (adaptive, up to 32 MiB) with its own mmap
and hands it back to the kernel on free, and it trims the heap's free top likewise. A training
step frees its activations at the end and allocates as many again in the next, so on a CPU every
step faulted its activation memory in anew, one 4 KiB page at a time, each first write zeroing the
page: 110-165 thousand page faults in a RETRO step of benchmarks/retro_vs_gpt.py's 512 size, a
fifth of its time on the 2-core VM of docs/profile.md (6.2 s a step against 4.9 kept). CUDA's
caching allocator keeps device memory for reuse in the same way; this asks glibc to do it for
host memory: every block from the heap, and the heap never trimmed. The price is that the process's resident memory stays at its
peak instead of shrinking after it, which a training process reaches in its first steps anyway.
"""

import ctypes
import sys

import torch

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1


def keep_freed_host_memory(device: torch.device | str = "cpu") -> bool:
    """When `device`, the one that computes, is the CPU: ask glibc to serve every block from its
    heap and never trim it. False where nothing changed: another device (its memory is not
    malloc's), or a C library that is not glibc (macOS, Windows, musl)."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc's mallopt takes these parameters
        return False
    # mallopt returns 1 on success; its value is an int, so "never" is INT_MAX bytes (2 GiB) of free top.
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
